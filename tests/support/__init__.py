"""Test infrastructure for poise: an independent h11 backend, process handles for the
backend and for ``python -m poise run``, and h11/raw-socket clients."""
