"""tickstream gateway service."""
