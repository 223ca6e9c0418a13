"""Private keys and signing requests: what `marco login` makes on the user's machine (the
controller's CA, `controller.pki`, uses the same key type)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def new_key() -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 key: every key of the cluster is one."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_user_request(user: str) -> tuple[bytes, str]:
    """For `marco login`: a new private key (PEM) and a CSR (PEM text) naming `user`."""
    key = new_key()
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user or "user")]))
               .sign(key, hashes.SHA256()))
    return key_pem(key), request.public_bytes(serialization.Encoding.PEM).decode()
