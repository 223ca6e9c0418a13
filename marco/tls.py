"""Mutual TLS between Marco's parts: the server side (agents, the controller's web port) and the
client side (controller, CLI, Ansible plugins), both built on the cluster CA.

Clients pin the certificate to the *node name* the inventory gave them, not to the address they
connect to: `ClientTls.context_for(node)` is an SSL context that verifies the peer against that
name whatever host the URL names (mDNS gives addresses, certificates carry names). Errors of the
handshake become typed errors with a sentence a user can act on (`describe_tls_error`).
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CertificateRefused, ConfigError

log = logging.getLogger(__name__)

#: Where an installed node or user finds the cluster's files (`marco-controller issue-agent`
#: writes a bundle with these names).
DEFAULT_TLS_DIR = "/etc/marco"
CA_FILE, CRL_FILE = "ca.pem", "crl.pem"


def file_stamps(*paths: str | os.PathLike[str] | None) -> tuple[float, ...]:
    """Modification times of files (-1 for a missing or unnamed one): compare two snapshots to
    know whether to reload."""
    stamps = []
    for path in paths:
        try:
            stamps.append(os.stat(path).st_mtime if path else -1.0)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


class PinnedNameContext(ssl.SSLContext):
    """An SSL context that checks the peer certificate against one fixed name (the node's),
    whatever `server_hostname` the HTTP library passes (it passes the IP address it dials)."""

    expected_name = ""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.expected_name or kwargs.get("server_hostname")
        return super().wrap_socket(sock, *args, **kwargs)

    def wrap_bio(self, incoming: Any, outgoing: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.expected_name or kwargs.get("server_hostname")
        return super().wrap_bio(incoming, outgoing, *args, **kwargs)


def certificate_not_after(path: str | os.PathLike[str]) -> datetime.datetime:
    """The expiry time (UTC) of the first certificate in a PEM file."""
    from cryptography import x509  # ansible-core depends on it; imported only where needed

    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot read certificate {path}: {reason}") from None
    return certificate.not_valid_after_utc


def _require_files(**paths: str | None) -> None:
    for what, path in paths.items():
        if not path:
            raise ConfigError(f"no TLS {what.replace('_', ' ')} configured")
        if not os.path.exists(path):
            raise ConfigError(f"TLS {what.replace('_', ' ')} {path} does not exist")




def _load_crl(context: ssl.SSLContext, crl_file: str | None) -> None:
    if crl_file and os.path.exists(crl_file):
        try:
            context.load_verify_locations(cafile=crl_file)
        except ssl.SSLError as exc:
            raise ConfigError(f"cannot load the revocation list {crl_file}: {exc}") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


@dataclass(frozen=True)
class ServerTlsFiles:
    """What a TLS server presents and whom it accepts."""

    cert_file: str
    key_file: str
    ca_file: str
    crl_file: str | None = None
    require_client_cert: bool = True

    def mtimes(self) -> tuple[float, ...]:
        return file_stamps(self.cert_file, self.key_file, self.ca_file, self.crl_file)

    def context(self) -> ssl.SSLContext:
        """A server context: our certificate, TLS 1.2+, and (for agents) a client certificate
        from the cluster CA, not revoked by the CRL, required on every connection."""
        _require_files(certificate=self.cert_file, key=self.key_file, CA_file=self.ca_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            context.load_verify_locations(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files ({self.cert_file}, {self.key_file}, "
                              f"{self.ca_file}): {exc}") from None
        if self.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            _load_crl(context, self.crl_file)
        return context


class ServerTlsReloader:
    """Swaps a running Tornado server's SSL context when its files change on disk (a new CRL
    after `marco-controller revoke-cert`, a renewed certificate): new connections use it."""

    def __init__(self, server: Any, files: ServerTlsFiles) -> None:
        self.server, self.files = server, files
        self._seen = files.mtimes()

    def check(self) -> bool:
        """Reload if anything changed; a broken new file keeps the old context (logged)."""
        seen = self.files.mtimes()
        if seen == self._seen:
            return False
        try:
            self.server.ssl_options = self.files.context()
        except ConfigError as error:  # half-copied files: try again next time
            log.error("keeping the previous TLS setup: %s", error.message)
            return False
        self._seen = seen
        log.info("TLS files changed: reloaded %s", self.files.cert_file)
        return True


class ClientTls:
    """A client's identity (certificate + key) and trust (cluster CA, optional CRL).

    Its own certificate's expiry is looked at only when a handshake fails (`expired`): parsing
    it on every start would cost each Ansible task ~30 ms of `cryptography` import."""

    def __init__(self, ca_file: str, cert_file: str, key_file: str,
                 crl_file: str | None = None) -> None:
        _require_files(CA_file=ca_file, client_certificate=cert_file, client_key=key_file)
        self.ca_file, self.cert_file, self.key_file, self.crl_file = (
            ca_file, cert_file, key_file, crl_file)
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._files_stamp = self._stamp()

    def expired(self) -> CertificateRefused | None:
        """If our own certificate has expired: the error that says so and what to do."""
        try:
            expiry = certificate_not_after(self.cert_file)
        except ConfigError:
            return None
        if expiry > datetime.datetime.now(datetime.UTC):
            return None
        return CertificateRefused(f"your client certificate {self.cert_file} expired on "
                                  f"{expiry:%Y-%m-%d %H:%M} UTC",
                                  hint="get a new one: marco login (or marco-controller "
                                       "issue-client)")

    def _stamp(self) -> tuple[float, ...]:
        return file_stamps(self.crl_file, self.cert_file, self.key_file, self.ca_file)

    def context_for(self, node_name: str) -> ssl.SSLContext:
        """A context that presents our certificate and accepts only a certificate from the
        cluster CA naming `node_name` (cached per name; changed files start afresh: a new CRL,
        a renewed certificate)."""
        stamp = self._stamp()
        if stamp != self._files_stamp:
            self._contexts.clear()
            self._files_stamp = stamp
        context = self._contexts.get(node_name)
        if context is None:
            context = PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)
            context.expected_name = node_name
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_verify_locations(cafile=self.ca_file)
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load TLS files ({self.cert_file}, {self.key_file}, "
                                  f"{self.ca_file}): {exc}") from None
            _load_crl(context, self.crl_file)
            self._contexts[node_name] = context
        return context


def server_trust_context(ca_file: str) -> ssl.SSLContext:
    """For command-line tools talking to the controller's HTTPS port: trust the cluster CA."""
    _require_files(CA_file=ca_file)
    context = ssl.create_default_context(cafile=ca_file)
    return context


_REFUSED_BY_PEER = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate and we sent none",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says our client certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it says our client certificate is revoked",
    "TLSV1_ALERT_UNKNOWN_CA": "our client certificate is not from its CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it refused our client certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "our certificate is not a client certificate "
                                           "(an agent's or the wrong kind)",
    "TLSV1_ALERT_DECRYPT_ERROR": "it refused our client certificate",
}


def describe_tls_error(exc: BaseException, peer: str) -> CertificateRefused | None:
    """A typed, readable error for a failed TLS handshake with `peer`, or None if `exc` is not
    a TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        hint = {"certificate has expired": "; reissue it (marco-controller issue-agent)",
                "certificate revoked": " (revoked by the cluster admin)",
                "unable to get local issuer certificate": ": not issued by this cluster's CA "
                "(a rogue or foreign agent?)",
                "self-signed certificate in certificate chain": ": not issued by this "
                "cluster's CA (a rogue or foreign agent?)",
                "unsuitable certificate purpose": ": not an agent's certificate (a client "
                "certificate posing as an agent?)"}.get(reason, "")
        return CertificateRefused(f"{peer} presented a certificate we refuse: {reason}{hint}")
    if isinstance(exc, ssl.SSLEOFError) or (isinstance(exc, ssl.SSLError)
                                            and exc.reason == "UNEXPECTED_EOF_WHILE_READING"):
        # TLS 1.3 checks the client certificate after our side of the handshake is done; the
        # peer's alert can be lost when it closes on a request we already sent.
        return CertificateRefused(f"{peer} closed the TLS connection at once: it most likely "
                                  "refused our client certificate (revoked, expired or from "
                                  "another CA; its log says which)")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _REFUSED_BY_PEER:
            return CertificateRefused(f"{peer} refused the connection: {_REFUSED_BY_PEER[reason]}")
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE") or "WRONG_VERSION" in reason:
            return CertificateRefused(f"{peer} does not speak TLS (an agent in --dev mode?)")
        return CertificateRefused(f"TLS with {peer} failed: {reason or exc}")
    return None
