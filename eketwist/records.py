"""The record cipher: AES-256-GCM per direction with counter nonces, keys derived from K_shared.

Pure: no I/O. The caller supplies the record header, which is authenticated as associated data.
"""

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TAG_BYTES = 16
NONCE_BYTES = 12
# A direction that reaches this many records is closed rather than ever reusing a nonce.
MAX_RECORDS = 2**64 - 1

CLIENT_TO_SERVER = b"client-to-server"
SERVER_TO_CLIENT = b"server-to-client"


class RecordAuthenticationError(Exception):
    """A record failed to decrypt: altered, reordered, replayed or truncated."""


def _derive(k_shared, label, length):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(k_shared)


class RecordCipher:
    """One direction of the record layer. repr() shows no key material."""

    __slots__ = ("_aead", "_iv", "_counter")

    def __init__(self, k_shared, direction):
        self._aead = AESGCM(_derive(k_shared, b"eketwist/1 " + direction + b" key", 32))
        self._iv = int.from_bytes(_derive(k_shared, b"eketwist/1 " + direction + b" iv", 12), "big")
        self._counter = 0

    def __repr__(self):
        return f"<RecordCipher records={self._counter}>"

    def _next_nonce(self):
        if self._counter >= MAX_RECORDS:
            raise RecordAuthenticationError("record counter exhausted")
        nonce = (self._iv ^ self._counter).to_bytes(NONCE_BYTES, "big")
        self._counter += 1
        return nonce

    def seal(self, header, plaintext):
        return self._aead.encrypt(self._next_nonce(), plaintext, header)

    def open(self, header, ciphertext):
        try:
            return self._aead.decrypt(self._next_nonce(), ciphertext, header)
        except InvalidTag:
            raise RecordAuthenticationError() from None


def traffic_ciphers(k_shared, *, is_client):
    """(send, receive) ciphers for one side; each direction has its own key and IV."""
    c2s = RecordCipher(k_shared, CLIENT_TO_SERVER)
    s2c = RecordCipher(k_shared, SERVER_TO_CLIENT)
    return (c2s, s2c) if is_client else (s2c, c2s)
