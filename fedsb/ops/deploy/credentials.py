"""The deployment's credentials: a CA, the SuperLink's TLS certificate, and SuperNode key pairs.

The only certificate generator in the project: the local deployment calls it for each run, and
scripts/gen-certs.sh (via `python -m fedsb.ops.deploy certs`) for docker-compose.yml and separate
hosts. The layout of a credentials directory:

    ca.crt, ca.key            a self-signed CA (EC P-384); ca.crt is what every client trusts
    server.pem, server.key    the SuperLink's certificate, signed by the CA, one subjectAltName per
                              host (IP or DNS)
    <name>, <name>.pub        a SuperNode's key pair, OpenSSH ECDSA P-384 (what flwr 1.41 takes for
                              --auth-supernode-private-key and `flwr supernode register`)

Private keys are written with mode 600, the rest 644. Needs only the `cryptography` package (a
dependency of flwr).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_NAME = "fedsb deployment CA"


@dataclass(frozen=True)
class Credentials:
    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def node_key(self, name: str) -> tuple[Path, Path]:
        """(private, public) OpenSSH key files of SuperNode `name`."""
        return self.directory / name, self.directory / f"{name}.pub"


def _write(path: Path, data: bytes, mode: int) -> None:
    # created with its mode, so a private key is never readable by others, not even briefly;
    # chmod too, because os.open keeps the mode of a file that already exists
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(mode)


def _subject_alt_names(hosts: Sequence[str]) -> list:
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def generate_credentials(directory: str | os.PathLike, *, hosts: Sequence[str] = DEFAULT_HOSTS,
                         node_names: Iterable[str] = (), days: int = 365, keep_existing: bool = False,
                         echo: Callable[[str], None] | None = None) -> Credentials:
    """Write ca.crt/ca.key, server.pem/server.key (for `hosts`) and one key pair per node name.

    With `keep_existing`, a CA already in `directory` (ca.crt and ca.key) and node keys already
    there are kept, so keys registered with a SuperLink stay valid when nodes are added; the
    SuperLink certificate is remade every time (so a new host takes effect at once). `echo` is
    told every file written or kept.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    say = echo or (lambda _msg: None)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)  # clock skew between hosts
    until = now + _dt.timedelta(days=days)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"

    if keep_existing and ca_cert_path.is_file() and ca_key_path.is_file():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        say(f"kept {ca_cert_path} (CA)")
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_cert_path, ca_cert.public_bytes(pem), 0o644)
        _write(ca_key_path, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
        say(f"wrote {ca_cert_path} (CA)")

    sans = _subject_alt_names(hosts)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    creds = Credentials(out, ca_cert_path, out / "server.pem", out / "server.key")
    _write(creds.server_cert, server_cert.public_bytes(pem), 0o644)
    _write(creds.server_key, server_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    described = ",".join(f"{'IP' if isinstance(n, x509.IPAddress) else 'DNS'}:{n.value}" for n in sans)
    say(f"wrote {creds.server_cert} (SuperLink certificate for {described})")

    for name in node_names:
        private, public = creds.node_key(name)
        if keep_existing and private.is_file():
            say(f"kept {private}, {public} (SuperNode key pair {name})")
            continue
        generate_node_key(out, name)
        say(f"wrote {private}, {public} (SuperNode key pair {name})")
    return creds


def generate_node_key(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """An OpenSSH ECDSA P-384 key pair `<name>`, `<name>.pub` (what flwr 1.41 accepts)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), 0o600)
    openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
    _write(public, openssh + f" {name}\n".encode(), 0o644)
    return private, public
