"""AIP-155 request ids of the AdminService's CreateKey and RotateKey: a
resend carrying the request id of a request already answered gets that
answer again (the same key id and secret) instead of a second key or a
second rotation, so a client whose reply was lost can safely send again.
The KeyStore stores the answer with the key it made, in one script
(services/router/keys.py), for REQUEST_ID_RETENTION_S.

The answer holds a secret, and Redis must hold nothing that serves a key:
it is stored only sealed (AES-GCM) under a key derived from the request id
(HKDF-SHA256), in a record named by another value derived from it (another
HKDF label), so Redis holds neither the request id nor the secret, and one
who reads it cannot open a record without the request id, which only the
client knows. That rests on the id being unguessable, hence UUID4s only
(meshgate/request_ids.py).

Request ids are one scope for the whole AdminService: every admin
credential may do anything to any tenant's keys, so an answer is no more
the credential's that sent it than the keys are; a resend under another
admin credential (one rotated in meanwhile) still gets it.
"""

from __future__ import annotations

import dataclasses
import json
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import Message

from meshgate import request_ids

# Distinct labels, so that a record's name says nothing of the key that seals it.
_NAME_LABEL = b"meshgate AdminService request id: record name"
_SEAL_LABEL = b"meshgate AdminService request id: sealing key"
_NONCE_BYTES = 12


def _derived(request_id: str, label: bytes) -> bytes:
    # No salt or stretching: the input is 122 random bits, not a password.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(request_id.encode())


def _sort_repeated_strings(request: Message) -> None:
    """CreateKey's models and fail_closed are sets: a resend that lists them
    in another order (a client that rebuilt its request from a set) is the
    same request. Named, not every repeated field: a list whose order means
    something must still tell two requests apart."""
    if request.DESCRIPTOR.name != "CreateKeyRequest":
        return
    request.models.sort()
    if request.HasField("limits"):
        request.limits.fail_closed.sort()


@dataclasses.dataclass(frozen=True)
class RequestId:
    # What names the request's record in Redis (64 hex digits).
    name: str
    sealing_key: bytes = dataclasses.field(repr=False)
    # SHA-256 of the request's message type and body without its request_id
    # (its sets in order): what a resend must match to be given the answer.
    request_digest: str

    @classmethod
    def of(cls, request: Message) -> RequestId | None:
        """The request's request id; None where it carries none (each send
        then acts anew); INVALID_ARGUMENT where it is not a UUID4."""
        canonical = request_ids.canonical(request.request_id)
        if canonical is None:
            return None
        digest = request_ids.digest(request, _sort_repeated_strings)
        return cls(_derived(canonical, _NAME_LABEL).hex(), _derived(canonical, _SEAL_LABEL), digest)

    def seal(self, answer: list[str]) -> bytes:
        """``answer`` with the request's digest, encrypted and authenticated."""
        # A fresh nonce each time: sends of one id at once each seal theirs
        # under the same key (one is kept).
        nonce = os.urandom(_NONCE_BYTES)
        plain = json.dumps({"request": self.request_digest, "answer": answer}).encode()
        return nonce + AESGCM(self.sealing_key).encrypt(nonce, plain, None)

    def open(self, sealed: bytes) -> list[str]:
        """The answer sealed under this request id; ALREADY_EXISTS
        REQUEST_ID_REUSED where it answered another request."""
        plain = AESGCM(self.sealing_key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], None)
        fields = json.loads(plain)
        if fields["request"] != self.request_digest:
            raise request_ids.reused()
        return fields["answer"]
