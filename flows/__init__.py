"""Prefect flows: compose the tasks in tasks/ (no logic of their own)."""
