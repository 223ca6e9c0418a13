"""The cluster's small CA: create it, issue agent, controller and user certificates, revoke them
(a CRL every agent loads), all with `cryptography` (an ansible-core dependency).

Layout of the PKI directory (`--pki-dir`, default /etc/marco/pki), written 0600/0700 where
secret:

    ca.pem  ca.key          the CA (the key never leaves this directory)
    controller.pem/.key     the controller: TLS server for the web page, client to agents
    crl.pem                 revoked serials, signed by the CA (pushed to agents; they reload it)
    issued.json             serial -> name, kind, expiry (for `revoke-cert NAME` and `list-certs`)

Keys are ECDSA P-256: fast to make and to verify, small certificates.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from marco.atomic import write_atomic as _write
from marco.errors import BadRequest, ConfigError
from marco.keys import key_pem, new_key
from marco.tls import CA_FILE, CRL_FILE

DEFAULT_PKI_DIR = "/etc/marco/pki"
CA_DAYS = 3650
AGENT_DAYS = 825
CONTROLLER_DAYS = 825
NAME_RULE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
KINDS = ("agent", "controller", "client", "user")


def valid_name(name: str, what: str = "name") -> str:
    """A certificate name: a host-name-like label (letters, digits, dots, dashes)."""
    if not NAME_RULE.match(name or ""):
        raise ConfigError(f"{what} {name!r} must be letters, digits, dots and dashes "
                          "(it goes into the certificate as a DNS name)")
    return name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True)
class IssuedBundle:
    """Files written for one certificate."""

    directory: Path
    cert_file: Path
    key_file: Path
    serial: int
    not_after: datetime.datetime


class ClusterPki:
    """The CA in one directory. Only the controller's host (or an admin's) holds it."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    # -- paths ----------------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.dir / CA_FILE

    @property
    def ca_key_file(self) -> Path:
        return self.dir / "ca.key"

    @property
    def crl_file(self) -> Path:
        return self.dir / CRL_FILE

    @property
    def controller_cert(self) -> Path:
        return self.dir / "controller.pem"

    @property
    def controller_key(self) -> Path:
        return self.dir / "controller.key"

    @property
    def issued_file(self) -> Path:
        return self.dir / "issued.json"

    def exists(self) -> bool:
        return self.ca_file.exists() and self.ca_key_file.exists()

    # -- creation -------------------------------------------------------------------------------
    def init(self, controller_names: Iterable[str] = (), cluster: str = "marco") -> None:
        """Create the CA, the controller's certificate and an empty CRL (refuses to overwrite)."""
        if self.exists():
            raise ConfigError(f"{self.dir} already holds a CA; remove it first to start over")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} CA"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Marco")])
        now = _now()
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                           crl_sign=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                             critical=False)
              .sign(key, hashes.SHA256()))
        _write(self.ca_key_file, key_pem(key), 0o600)
        _write(self.ca_file, _cert_pem(ca), 0o644)
        self.write_crl()
        host = socket.gethostname()
        names = ["marco-controller", host, host.split(".")[0], "localhost", "127.0.0.1", "::1",
                 *controller_names]
        self.issue("marco-controller", "controller", extra_names=names,
                   cert_file=self.controller_cert, key_file=self.controller_key)

    def renew_controller(self, extra_names: Iterable[str] = ()) -> IssuedBundle:
        """A new key and certificate for the controller with the names of the old one (and any
        new ones); the running controller picks them up within seconds."""
        names: list[str] = []
        try:
            old = x509.load_pem_x509_certificate(self.controller_cert.read_bytes())
            san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
            names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        except (OSError, ValueError, x509.ExtensionNotFound):
            host = socket.gethostname()
            names = [host, host.split(".")[0], "localhost", "127.0.0.1", "::1"]
        return self.issue("marco-controller", "controller", extra_names=[*names, *extra_names],
                          cert_file=self.controller_cert, key_file=self.controller_key)

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise ConfigError(f"no CA in {self.dir}: run `marco-controller init` first")
        try:
            certificate = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_file.read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the CA in {self.dir}: {exc}") from None
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return certificate, key

    def _sign(self, subject: str, public_key: Any, kind: str, days: float,
              names: Iterable[str]) -> x509.Certificate:
        ca, ca_key = self._ca()
        now = _now()
        usages = {"agent": [ExtendedKeyUsageOID.SERVER_AUTH],
                  "controller": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                  "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
                  "user": [ExtendedKeyUsageOID.CLIENT_AUTH]}[kind]
        not_after = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject),
                                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                               kind)]))
                   .issuer_name(ca.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        san_names = list(names)
        if san_names:
            builder = builder.add_extension(_san(san_names), critical=False)
        with self._locked():
            certificate = builder.sign(ca_key, hashes.SHA256())
            self._record(certificate.serial_number, subject, kind,
                         certificate.not_valid_after_utc)
        return certificate

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer of issued.json and crl.pem at a time (issue and revoke-cert may run in
        two processes at once; a lost revocation would un-revoke a certificate)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def issue(self, name: str, kind: str, days: float | None = None,
              extra_names: Iterable[str] = (), out_dir: Path | None = None,
              cert_file: Path | None = None, key_file: Path | None = None) -> IssuedBundle:
        """A new key and certificate for `name` (agents: the node name is the DNS name the
        clients check). Written to `out_dir` (or the given files), key 0600."""
        if kind not in KINDS:
            raise ConfigError(f"unknown certificate kind {kind!r}")
        valid_name(name, "node name" if kind == "agent" else "name")
        days = days or (AGENT_DAYS if kind in ("agent", "client") else CONTROLLER_DAYS)
        stem = "agent" if kind == "agent" else "client"
        if out_dir is not None:
            bundle_dir(out_dir)  # refuse a bad place before anything is issued
            if (out_dir / f"{stem}.key").exists():
                # Overwriting would take the key of a certificate that stays valid from its user.
                raise ConfigError(f"{out_dir} already holds a bundle ({stem}.key): give another "
                                  "--out, or remove it first")
        key = new_key()
        names = [name, *extra_names] if kind in ("agent", "controller") else []
        certificate = self._sign(name, key.public_key(), kind, days, names)
        if out_dir is not None:
            cert_file, key_file = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
            _write(out_dir / CA_FILE, self.ca_file.read_bytes(), 0o644)
            _write(out_dir / CRL_FILE, self.crl_file.read_bytes(), 0o644)
        assert cert_file is not None and key_file is not None
        _write(key_file, key_pem(key), 0o600)
        _write(cert_file, _cert_pem(certificate), 0o644)
        return IssuedBundle(cert_file.parent, cert_file, key_file, certificate.serial_number,
                            certificate.not_valid_after_utc)

    def sign_user_request(self, csr_pem: str, user: str, lifetime: float) -> str:
        """A short-lived client certificate for a logged-in user's own key (`marco login`
        sends a CSR; the key never leaves the user's machine). The name is the PAM user's,
        whatever the request says."""
        try:
            request = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise BadRequest("'csr' is not a PEM certificate request") from None
        if not request.is_signature_valid:
            raise BadRequest("the certificate request's signature is invalid")
        public_key = request.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
                not isinstance(public_key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise BadRequest("the certificate request must be for a P-256 or P-384 EC key")
        certificate = self._sign(user, public_key, "user", lifetime / 86400, [])
        return _cert_pem(certificate).decode()

    # -- records and revocation -----------------------------------------------------------------
    def issued(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.issued_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ConfigError(f"{self.issued_file} is corrupt: {exc}") from None

    def _record(self, serial: int, name: str, kind: str, not_after: datetime.datetime,
                revoked: float | None = None) -> None:
        if kind == "user":
            return  # short-lived and many: not worth a record (they expire with the login)
        records = self.issued()
        records[str(serial)] = {"name": name, "kind": kind, "not_after": not_after.isoformat(),
                                "revoked": revoked}
        _write(self.issued_file, json.dumps(records, indent=1).encode(), 0o600)

    def revoke(self, which: str) -> list[int]:
        """Revoke by serial (decimal or hex) or by name (every certificate of that name) and
        rewrite the CRL. Returns the serials revoked."""
        with self._locked():
            return self._revoke(which)

    def _revoke(self, which: str) -> list[int]:
        records = self.issued()
        serials = [int(s) for s, r in records.items() if r["name"] == which and not r["revoked"]]
        if not serials:
            try:
                serial = int(which, 16) if which.lower().startswith("0x") else int(which)
            except ValueError:
                raise ConfigError(f"no certificate named {which!r} (see list-certs)") from None
            serials = [serial]
        stamp = _now().timestamp()
        for serial in serials:
            record = records.setdefault(str(serial), {"name": "?", "kind": "?",
                                                      "not_after": None, "revoked": None})
            record["revoked"] = stamp
        _write(self.issued_file, json.dumps(records, indent=1).encode(), 0o600)
        self.write_crl()
        return serials

    def write_crl(self) -> Path:
        """Sign a CRL of every revoked serial. Agents get it copied rather than fetching it,
        so it is valid until the CA expires: an expired CRL would lock everyone out (OpenSSL
        refuses every certificate when the CRL it must check is out of date)."""
        ca, key = self._ca()
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
                   .last_update(now - datetime.timedelta(minutes=5))
                   .next_update(ca.not_valid_after_utc))
        for serial, record in sorted(self.issued().items()):
            if record.get("revoked"):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(serial))
                    .revocation_date(datetime.datetime.fromtimestamp(record["revoked"],
                                                                     datetime.UTC))
                    .build())
        crl = builder.sign(key, hashes.SHA256())
        _write(self.crl_file, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.crl_file


def bundle_dir(path: Path) -> Path:
    """A directory for keys: created 0700, or an existing real directory (never a symlink) that
    only its owner can enter."""
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link: give a real directory for the bundle")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory: give a directory for the bundle")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ConfigError(f"{path} must be yours and 0700 (it will hold a private key)")
    return path


def write_secret_copy(source: str | os.PathLike[str], destination: Path) -> None:
    """The cluster secret into a bundle, 0600 from the first byte."""
    _write(destination, Path(source).read_bytes(), 0o600)
