"""Throwaway TLS material for tests: a CA, a server certificate for 127.0.0.1/localhost, a client certificate,
and a client certificate from an unrelated CA, written as PEM files (EC P-256, valid for one day).

    certs = make_certs(tmp_path)   # -> CertPaths with the file paths
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPaths:
    ca: Path  # trust anchor for both sides
    server_cert: Path  # SAN: localhost, 127.0.0.1
    server_key: Path
    client_cert: Path  # CN=device-1, signed by `ca`
    client_key: Path
    rogue_client_cert: Path  # signed by a CA the server does not trust
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sign(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def make_certs(directory: Path) -> CertPaths:
    """Generate every certificate into `directory` and return their paths."""
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "rogue", "server", "client", "mal")}
    ca = _sign("mist test CA", keys["ca"], "mist test CA", keys["ca"], ca=True)
    rogue_ca = _sign("rogue CA", keys["rogue"], "rogue CA", keys["rogue"], ca=True)
    server = _sign(
        "localhost",
        keys["server"],
        "mist test CA",
        keys["ca"],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _sign("device-1", keys["client"], "mist test CA", keys["ca"], usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_client = _sign("device-x", keys["mal"], "rogue CA", keys["rogue"], usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = _write(directory, "ca", ca, keys["ca"])
    _write(directory, "rogue-ca", rogue_ca, keys["rogue"])
    server_cert, server_key = _write(directory, "server", server, keys["server"])
    client_cert, client_key = _write(directory, "client", client, keys["client"])
    rogue_cert, rogue_key = _write(directory, "rogue-client", rogue_client, keys["mal"])
    return CertPaths(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)
