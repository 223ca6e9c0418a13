"""The agent's copy of the cluster CA's revocation list, updated by the controller's pushes
(`PUT /v1/crl`): accepted only when signed by the cluster CA and not older than the one held,
written atomically where the TLS reloader picks it up."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from marco.atomic import write_atomic
from marco.errors import BadRequest, ConfigError, Conflict

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

MAX_CRL_BYTES = 4 * 1024 * 1024


class CrlStore:
    """The CRL file the agent's TLS context loads, and the CA that must have signed it."""

    def __init__(self, crl_file: str, ca_file: str) -> None:
        self.path, self.ca_file = Path(crl_file), Path(ca_file)

    def accept(self, pem: bytes) -> bool:
        """Install `pem` if it is a CRL of our CA at least as recent as ours; True if the file
        changed. A forged or foreign CRL is a BadRequest, an older one a Conflict."""
        from cryptography import x509  # only agents with TLS get here

        if len(pem) > MAX_CRL_BYTES:
            raise BadRequest("CRL too large")
        try:
            crl = x509.load_pem_x509_crl(pem)
            ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        except ValueError:
            raise BadRequest("not a PEM certificate revocation list") from None
        except OSError as exc:
            raise ConfigError(f"cannot read the CA {self.ca_file}: {exc.strerror}") from None
        # The cluster CA's key is EC; public_key()'s union also holds types no CRL is signed with.
        if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise BadRequest("the CRL is not signed by this cluster's CA")
        current = self._current()
        if current is not None:
            if current.public_bytes(_pem()) == crl.public_bytes(_pem()):
                return False
            if crl.last_update_utc < current.last_update_utc:
                raise Conflict("the CRL is older than the one this agent has")
        write_atomic(self.path, crl.public_bytes(_pem()), 0o644)
        return True

    def _current(self) -> x509.CertificateRevocationList | None:
        from cryptography import x509

        try:
            return x509.load_pem_x509_crl(self.path.read_bytes())
        except (OSError, ValueError):
            return None


def _pem() -> serialization.Encoding:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM
