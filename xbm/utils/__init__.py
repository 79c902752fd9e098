"""Logging, seeding and device helpers."""
