"""A real cluster CA for the tests (made with `controller.pki`, the code `marco-controller
init` runs), and the certificates each agent, controller and user needs."""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from controller.pki import ClusterPki, IssuedBundle
from marco.atomic import write_atomic
from marco.tls import ClientTls


class TestPki(ClusterPki):
    """The CA plus a cache of issued bundles: one per node name, one test client."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, directory: Path, controller_names: tuple[str, ...] = ()) -> None:
        """`controller_names`: addresses the controller's certificate names besides localhost,
        like `marco-controller init --name ADDRESS` on a real install (the netns bridges)."""
        super().__init__(directory)
        if not self.exists():
            self.init(controller_names=controller_names)
        os.chmod(self.dir, 0o755)  # only the key files inside are secret (0600)
        self._client: ClientTls | None = None

    def agent_bundle(self, node: str) -> Path:
        """The bundle `marco-controller issue-agent NODE` writes (issued once per name)."""
        out = self.dir / "agents" / node
        if not (out / "agent.pem").exists():
            self.issue(node, "agent", out_dir=out)
        return out

    def agent_args(self, node: str) -> list[str]:
        out = self.agent_bundle(node)
        return ["--tls-cert", str(out / "agent.pem"), "--tls-key", str(out / "agent.key"),
                "--tls-ca", str(out / "ca.pem"), "--tls-crl", str(out / "crl.pem")]

    def client_tls(self) -> ClientTls:
        """The test process's own client identity (like an automation certificate)."""
        if self._client is None:
            out = self.dir / "clients" / "tester"
            if not (out / "client.pem").exists():
                self.issue("tester", "client", out_dir=out)
            self._client = ClientTls(str(self.ca_file), str(out / "client.pem"),
                                     str(out / "client.key"), str(self.crl_file))
        return self._client

    def client_env(self) -> dict[str, str]:
        """The test client's files as the MARCO_CLIENT_* variables the CLI and plugins read."""
        tls = self.client_tls()
        return {"MARCO_CLIENT_CERT": tls.cert_file, "MARCO_CLIENT_KEY": tls.key_file,
                "MARCO_TLS_CA": tls.ca_file}

    def issue_expired(self, name: str, kind: str, out_dir: Path) -> IssuedBundle:
        """A bundle as `issue` writes it whose certificate expired a day ago (no waiting)."""
        now = datetime.datetime.now(datetime.UTC)
        return self.redate(self.issue(name, kind, out_dir=out_dir),
                           now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))

    def redate(self, bundle: IssuedBundle, not_before: datetime.datetime,
               not_after: datetime.datetime) -> IssuedBundle:
        """Rewrite `bundle`'s certificate with other validity dates, everything else kept (key,
        serial, names, usages; signed by the CA): expired or not yet valid without sleeping."""
        old = x509.load_pem_x509_certificate(bundle.cert_file.read_bytes())
        _, ca_key = self._ca()
        builder = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer)
                   .public_key(old.public_key()).serial_number(old.serial_number)
                   .not_valid_before(not_before).not_valid_after(not_after))
        for extension in old.extensions:
            builder = builder.add_extension(extension.value, extension.critical)
        certificate = builder.sign(ca_key, hashes.SHA256())
        write_atomic(bundle.cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        return dataclasses.replace(bundle, not_after=certificate.not_valid_after_utc)

    def crl_dated(self, last_update: datetime.datetime) -> bytes:
        """The CA's current CRL (same revocations) re-signed with another last-update time, not
        written anywhere: newer or older than one an agent holds, without waiting a second."""
        current = x509.load_pem_x509_crl(self.crl_file.read_bytes())
        _, ca_key = self._ca()
        next_update = current.next_update_utc or last_update + datetime.timedelta(days=1)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(current.issuer)
                   .last_update(last_update).next_update(next_update))
        for revoked in current:
            builder = builder.add_revoked_certificate(revoked)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
