"""Database access: the local cluster, migrations and the connection pool."""

#: Session settings of the API's pooled connections (primary and replicas). Times in UTC; no JIT: the API's
#: statements are short, and a misestimated one (the cells' lateral reads, estimated at millions of rows for
#: a few thousand) would spend ~90 ms compiling for a 16 ms execution. Exports have their own connections.
POOL_OPTIONS = "-c timezone=UTC -c jit=off"
