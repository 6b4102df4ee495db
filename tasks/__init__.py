"""Prefect tasks: thin wrappers over the mess_ai core."""
