"""tickstream stats service."""
