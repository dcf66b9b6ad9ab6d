"""Figures for notebook gradients (filled in by its notebook's work)."""
