"""Figures for notebook embedding (filled in by its notebook's work)."""
