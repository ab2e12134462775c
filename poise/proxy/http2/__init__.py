"""HTTP/2 from clients: the connection preface or ALPN picks it, H2Session serves it."""
