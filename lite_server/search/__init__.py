"""Searching the index: nearest-neighbour backends, request batching, the lookup, and the public document built from it."""
