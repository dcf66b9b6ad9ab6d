"""Figures for notebook hierarchy (filled in by its notebook's work)."""
