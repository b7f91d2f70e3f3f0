"""tickstream alerts service."""
