"""Deployments: ways to start the flows (schedules, workers, watchers)."""
