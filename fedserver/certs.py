"""`fedserver certs`: a CA, a server certificate and one client certificate per device, for mutual TLS.

Device certificates carry the device id twice: as the subject CN and as a
SAN URI ``fedtune://device/<id>``; the server trusts the URI (see
fedserver.auth). Private keys are written with mode 0600. ECDSA P-256 keeps
the handshake cheap on the devices.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVICE_URI = "fedtune://device/"
ADMIN_URI = "fedtune://admin/"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class FleetFiles:
    """Where `write_fleet` put things."""
    out: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    devices: dict[str, tuple[Path, Path]]  # device id -> (cert, key)
    tokens: Path

    def device(self, device_id: str) -> tuple[Path, Path]:
        return self.devices[device_id]

    def server_settings(self) -> dict[str, Path]:
        """ServerConfig fields for mutual TLS with this fleet."""
        return {"tls_cert": self.server_cert, "tls_key": self.server_key, "tls_ca": self.ca_cert}

    def client_args(self, device_id: str) -> list[str]:
        """`fedclient run` flags for mutual TLS as device_id."""
        cert, key = self.devices[device_id]
        return ["--tls-ca", str(self.ca_cert), "--tls-cert", str(cert), "--tls-key", str(key)]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            # An hour of slack for devices whose clocks lag the CA's.
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days)))


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.unlink(missing_ok=True)
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class Authority:
    """A CA that signs server and client certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key, self.cert = key, cert

    @classmethod
    def create(cls, name: str = "fedtune fleet CA", days: int = 3650) -> Authority:
        key = _key()
        subject = _name(name)
        cert = (_builder(subject, subject, key.public_key(), days)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Authority:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cls(key, cert)  # type: ignore[arg-type]

    def _sign(self, cn: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
              days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = _key()
        cert = (_builder(_name(cn), self.cert.subject, key.public_key(), days)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return key, cert

    def server(self, names: Sequence[str], days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A server certificate valid for every host name and IP address in names."""
        if not names:
            raise ValueError("a server certificate needs at least one host name or IP address")
        return self._sign(names[0], [_san_entry(n) for n in names], ExtendedKeyUsageOID.SERVER_AUTH, days)

    def device(self, device_id: str, days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        return self._sign(device_id, [x509.UniformResourceIdentifier(DEVICE_URI + device_id)],
                          ExtendedKeyUsageOID.CLIENT_AUTH, days)

    def admin(self, name: str, days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """An operator's certificate: may call RPCs that speak for no device (status), never for one."""
        return self._sign(name, [x509.UniformResourceIdentifier(ADMIN_URI + name)],
                          ExtendedKeyUsageOID.CLIENT_AUTH, days)


def write_fleet(out: Path, devices: Sequence[str], server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
                admins: Sequence[str] = ("admin",)) -> FleetFiles:
    """CA, server and per-device certificates (and enrollment tokens) under out."""
    from .auth import DEVICE_ID  # the same rule the server applies to ids on the wire

    bad = [d for d in devices if not DEVICE_ID.match(d)]
    if bad:
        raise ValueError(f"device id {bad[0]!r} must be 1-128 characters of letters, digits and ._:-")
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be unique")
    out.mkdir(parents=True, exist_ok=True)
    ca = Authority.create()
    write_cert(out / "ca.pem", ca.cert)
    write_key(out / "ca.key", ca.key)
    key, cert = ca.server(list(dict.fromkeys(server_names)))
    write_cert(out / "server.pem", cert)
    write_key(out / "server.key", key)
    files: dict[str, tuple[Path, Path]] = {}
    for name in admins:
        key, cert = ca.admin(name)
        write_cert(out / f"{name}.pem", cert)
        write_key(out / f"{name}.key", key)
    dev_dir = out / "devices"
    dev_dir.mkdir(exist_ok=True)
    lines = ["# device_id token: for TLS without client certificates (server: enrollment_tokens = this file)"]
    for d in devices:
        key, cert = ca.device(d)
        c, k = dev_dir / f"{d}.pem", dev_dir / f"{d}.key"
        write_cert(c, cert)
        write_key(k, key)
        files[d] = (c, k)
        lines.append(f"{d} {secrets.token_urlsafe(24)}")
    tokens = out / "tokens.txt"
    tokens.unlink(missing_ok=True)
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return FleetFiles(out, out / "ca.pem", out / "server.pem", out / "server.key", files, tokens)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")
