"""Features: load MERT-v1 once per process and turn audio windows into per-layer hidden states."""
