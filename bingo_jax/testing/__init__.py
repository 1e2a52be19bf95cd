"""Helpers for the tests and the bench scripts (not used by the package itself)."""
