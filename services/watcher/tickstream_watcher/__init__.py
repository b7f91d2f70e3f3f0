"""tickstream watcher service."""
