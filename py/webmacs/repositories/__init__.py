"""SQL for each resource: keyword-only async functions, `%(name)s` parameters, no string-built SQL."""
