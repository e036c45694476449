"""blockrag.kvstore (see the project's issues)."""
