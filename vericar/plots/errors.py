"""Figures for notebook errors (filled in by its notebook's work)."""
