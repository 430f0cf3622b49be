"""Data: synthetic universes and in-memory datasets."""
