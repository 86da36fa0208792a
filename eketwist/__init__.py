"""eketwist: a file server and client protected by a username and a password (SPAKE2+, RFC 9383)."""

__version__ = "0.1.0"
