"""TLS certificates for the SuperLink and key pairs for SuperNode authentication.

A deployment needs two kinds of secrets, and this module makes both with ``cryptography``
so that no one has to get ``openssl`` or ``ssh-keygen`` flags right:

- ``write_tls``: a private CA (``ca.crt``, ``ca.key``) and a SuperLink server certificate
  (``server.pem``, ``server.key``) signed by it, valid for the host names and IP addresses
  the SuperNodes and the ``flwr`` CLI use to reach the SuperLink, plus loopback: in flwr
  1.41 the SuperLink's own ServerApp process connects back to it over TLS on 127.0.0.1.
  Institutions and the operator receive ``ca.crt`` only; ``ca.key`` stays offline.
- ``write_node_keys``: one ECDSA P-384 key pair per institution in OpenSSH format, the format
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register``
  accepts. The private key never leaves the institution.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from privatune.common.errors import PrivatuneError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
_DNS_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$")
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertError(PrivatuneError):
    """Bad input for certificate or key generation; the message is meant for the user."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def parse_san(value: str) -> x509.GeneralName:
    """An IP address or a DNS name as a subject alternative name."""
    value = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _DNS_NAME.match(value) or len(value) > 253:
        raise CertError(f"not an IP address or DNS name: {value!r}")
    return x509.DNSName(value)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; the SuperLink's ECDHE key signs and agrees keys."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privatune federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write a file; private keys are created readable by the owner only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        path.chmod(0o600)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertError(f"{', '.join(existing)} already exist(s); use --force to replace")


def write_tls(out_dir: Path, sans: list[str], days: int = 365, force: bool = False) -> TlsFiles:
    """Create a CA and a SuperLink certificate for ``sans`` and loopback (the first SAN is
    also the CN)."""
    if not sans:
        raise CertError("give at least one --san (host name or IP the SuperLink is reached at)")
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    names = list(dict.fromkeys(parse_san(s) for s in [*sans, *LOOPBACK_SANS]))
    files = TlsFiles(*(out_dir / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)))
    _refuse_overwrite(list(vars(files).values()), force)
    out_dir.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_subject = _name("privatune federation CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0].strip()))
        .issuer_name(ca_subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def write_node_keys(out_dir: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Create ``<name>`` (private) and ``<name>.pub`` (public, to register with the SuperLink)."""
    if not _NODE_NAME.match(name):
        raise CertError(
            f"institution name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    private, public = out_dir / name, out_dir / f"{name}.pub"
    _refuse_overwrite([private, public], force)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    openssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(public, openssh + f" {name}\n".encode(), private=False)
    return private, public
