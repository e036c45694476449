"""blockrag.retriever (see the project's issues)."""
