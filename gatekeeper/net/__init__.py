"""Moving bytes and the sockets they move through: addresses, listeners, the client allowlist, the
copy and splice(2) data paths, and watching queued clients.
"""
