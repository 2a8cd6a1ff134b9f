"""A real PostgreSQL server for the tests (Debian's postgresql package): filled in by the PostgreSQL work."""
