"""Validation of engines against their FP reference graph (Polygraphy harness)."""
