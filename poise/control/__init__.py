"""The control plane: process supervision, signals, (later) reload and snapshots."""
