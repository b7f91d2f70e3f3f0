"""Code used by two or more tickstream services: schemas, settings, naming, client helpers."""
