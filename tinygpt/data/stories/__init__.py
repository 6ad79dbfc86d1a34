"""The built-in data source: a procedural generator of children's stories (no network)."""
