"""inetd mode: one child process per admitted connection.
"""
