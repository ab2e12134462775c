"""The data plane: listeners, the HTTP/1.1 proxy and (later) the TCP relay."""
