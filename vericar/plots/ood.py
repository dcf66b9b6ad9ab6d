"""Figures for notebook ood (filled in by its notebook's work)."""
