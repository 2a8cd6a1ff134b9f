"""A real redis-server for the tests (Debian's redis-server package): filled in by the Redis queue work."""
