"""An agent registering with a controller mDNS does not reach (issue 15): what both sides share.

The agent asks `GET /api/register` for a fresh challenge, then `POST /api/register` with its
node certificate and an ECDSA signature, by the certificate's key, over the message below. The
node certificates of the cluster are TLS server certificates only (OpenSSL refuses them as
client certificates), so the node proves its certificate by this signature over a TLS
connection on which it checked the controller's certificate against the cluster CA.
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

REGISTER_PATH = "/api/register"
ACTIONS = ("register", "deregister")
MAX_BODY = 16 * 1024  # a certificate (under 1 KiB), a signature, a few short fields
_CONTEXT = b"marco-register\0"  # a signature made for anything else never matches


def registration_message(action: str, node: str, port: int, address: str, nonce: str) -> bytes:
    """The bytes a registration's signature covers: every field the controller acts on."""
    fields = {"action": action, "node": node, "port": port, "address": address, "nonce": nonce}
    return _CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign_registration(key_pem: bytes, message: bytes) -> str:
    """The node's signature (base64 DER ECDSA-SHA256) with its private key (PEM)."""
    key = serialization.load_pem_private_key(key_pem, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the node's key is not an EC key (every key of the cluster is P-256)")
    return base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def signature_valid(certificate: x509.Certificate, message: bytes, signature: object) -> bool:
    """Whether `signature` (base64) over `message` was made by the key of `certificate`."""
    public_key = certificate.public_key()
    if not isinstance(signature, str) or not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(base64.b64decode(signature, validate=True), message,
                          ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
