"""Database access: the local cluster, migrations and the connection pool."""
