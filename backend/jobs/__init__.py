"""Background jobs: the huey queue (`queue.py`) and its tasks (`tasks.py`), thin wrappers of backend functions."""
