"""Certificates made in the test (``cryptography``): a CA and the leaves it signs, and a folder laid out and
updated the way the kubelet lays out and updates a ``kubernetes.io/tls`` Secret volume."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Ca:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path


@dataclass
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def not_after(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()


def make_ca(name: str) -> Ca:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(name, key, cert)


def make_leaf(
    ca: Ca, days: int = 7, *, dns: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)
) -> Leaf:
    """A server certificate for the names `dns` and addresses `ips` (default: localhost and 127.0.0.1), valid for
    `days` (whole seconds: X.509 has no less)."""
    key = _key()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln-server")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Leaf(cert, key)


def write_secret_volume(folder: Path, files: dict[str, bytes]) -> None:
    """What the kubelet does to a Secret volume: the files in a new hidden folder, then the ``..data`` symlink
    swapped to it in one rename (atomic), with ``tls.crt`` -> ``..data/tls.crt`` and so on; the old folder is
    removed. A reader of ``folder/tls.crt`` sees the old pair or the new one, never a mix."""
    folder.mkdir(parents=True, exist_ok=True)
    fresh = folder / f"..{dt.datetime.now(dt.UTC):%Y_%m_%d_%H_%M_%S}.{uuid.uuid4().hex[:8]}"
    fresh.mkdir()
    for name, data in files.items():
        (fresh / name).write_bytes(data)
    data_link = folder / "..data"
    old = data_link.resolve() if data_link.is_symlink() else None
    tmp = folder / "..data_tmp"
    os.symlink(fresh.name, tmp)
    os.replace(tmp, data_link)
    for name in files:
        link = folder / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)
    if old is not None:
        for child in old.iterdir():
            child.unlink()
        old.rmdir()
