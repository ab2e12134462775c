"""poise — a load balancer on uvloop + httptools."""

__version__ = "0.1.0"
