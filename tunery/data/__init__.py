"""Data sources, validation and splitting."""
