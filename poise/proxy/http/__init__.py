"""HTTP/1.1 reverse proxy on raw asyncio Protocols and httptools."""
