"""Measurements of eketwist against baselines: `make bench` (speed) and `make hostile` (load)."""
