"""Tunery: keep a fine-tuned transformer fresh, from versioned data to a served, compressed model."""

__version__ = "0.1.0"
