"""The files a federation's TLS and node authentication need, made with `cryptography`.

`privmed certs DIR`: a certificate authority (ca.crt, ca.key) and the coordinator's certificate
signed by it (server.crt, server.key) for the names and addresses it will be reached at. The
hospitals get ca.crt only (to check the coordinator); ca.key and server.key stay with the coordinator.

`privmed keys DIR`: a hospital's node-authentication key pair (NAME / NAME.pub), an ECDSA key on
NIST P-384 in OpenSSH format as Flower's SuperNode expects. The coordinator registers NAME.pub; the
hospital keeps NAME.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privmed import io
from privmed.errors import PrivmedError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


class CredentialsError(PrivmedError):
    pass


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def make_certificates(out: Path, names: list[str] | None = None, days: int = 365) -> list[Path]:
    """Write a CA and a server certificate for `names` (the host names and IP addresses the
    hospitals reach the coordinator at) into `out`. The certificate always covers localhost,
    127.0.0.1 and ::1 too: `privmed serve` and `privmed run` reach the SuperLink over loopback on
    the coordinator's machine. Refuses to overwrite existing files."""
    out = Path(out)
    names = list(dict.fromkeys([*(names or []), *DEFAULT_NAMES]))
    files = [out / f for f in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    taken = [str(f) for f in files if f.exists()]
    if taken:
        raise CredentialsError(f"certs: {', '.join(taken)} already exist; choose another directory")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privmed federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    io.write_bytes(out / CA_CERT, ca.public_bytes(serialization.Encoding.PEM))
    io.write_bytes(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    for path, k in ((out / CA_KEY, ca_key), (out / SERVER_KEY, key)):
        io.write_bytes(path, _pem_key(k), private=True)
    return files


def make_node_keys(out: Path, name: str) -> tuple[Path, Path]:
    """Write a node-authentication key pair `out/name` (private, OpenSSH) and `out/name.pub`."""
    out = Path(out)
    if not name or "/" in name or name.startswith("."):
        raise CredentialsError(f"keys: --name '{name}' is not a plain file name")
    private, public = out / name, out / f"{name}.pub"
    taken = [str(f) for f in (private, public) if f.exists()]
    if taken:
        raise CredentialsError(f"keys: {', '.join(taken)} already exist; choose another --name or directory")
    key = ec.generate_private_key(ec.SECP384R1())
    io.write_bytes(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                          serialization.NoEncryption()),
        private=True,
    )
    io.write_bytes(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" privmed-{name}\n".encode(),
    )
    return private, public


def check_certs(certs: Path, server: bool) -> dict[str, Path]:
    """The certificate files of `certs` that a coordinator (`server`) or a hospital needs;
    CredentialsError naming the first missing one."""
    if certs is None:
        raise CredentialsError("--certs is required (the directory `privmed certs` wrote)")
    certs = Path(certs).expanduser().resolve()
    need = (CA_CERT, SERVER_CERT, SERVER_KEY) if server else (CA_CERT,)
    for f in need:
        if not (certs / f).is_file():
            raise CredentialsError(
                f"--certs: {certs / f} is missing; make the directory with `privmed certs {certs}`"
                + ("" if server else " on the coordinator and copy its ca.crt here")
            )
    return {f: certs / f for f in need}
