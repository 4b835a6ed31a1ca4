"""encode stage."""
