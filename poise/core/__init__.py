"""The pure heart of poise: no sockets, no asyncio, time and randomness injected.

Shared as-is by the proxy's data plane, its control plane and the client library.
"""
