"""Analyst path: downsamplers, series queries, exports, retention (issue 6)."""
