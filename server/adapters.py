"""Adapters registering the built-in analysis kinds (filled in as analyses land)."""
