"""blockrag.integrations (see the project's issues)."""
