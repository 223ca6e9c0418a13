"""Real browser for tests: Debian's chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def spki_pin(cert_file: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a certificate, as chromium's pin list wants."""
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def launch(playwright, trust: Path | None = None):
    """Chromium; with `trust`, it accepts that one certificate's key (the controller's, which
    the cluster CA issued) the way a user who imported the CA would: every other
    certificate error still fails. Nothing else is relaxed."""
    args = list(CHROMIUM_ARGS)
    if trust is not None:
        args.append(f"--ignore-certificate-errors-spki-list={spki_pin(trust)}")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=args)
