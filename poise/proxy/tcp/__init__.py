"""The L4 (TCP) proxy: relay, passthrough, warm connections."""
