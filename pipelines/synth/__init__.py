"""Synthetic MR studies for demos and tests (no real patient data)."""
