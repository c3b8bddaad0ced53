"""
A throwaway certificate authority and a server certificate it signed, for ``wss://`` tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import endpoints, ssl


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS test: a CA certificate, and a server key and certificate it signed."""

    ca: Path
    key: Path
    cert: Path

    def serverCertificate(self) -> ssl.PrivateCertificate:
        """The server's key and certificate, for a TLS context (``.options()``)."""
        return ssl.PrivateCertificate.loadPEM(self.cert.read_bytes() + self.key.read_bytes())

    def trustRoot(self) -> ssl.Certificate:
        """The CA certificate, for a client that must trust the server."""
        return ssl.Certificate.loadPEM(self.ca.read_bytes())

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> str:
        """A ``--listen`` description serving TLS with these files."""
        quote = endpoints.quoteStringArgument
        return (
            f"ssl:{port}:interface={quote(interface)}"
            f":privateKey={quote(str(self.key))}:certKey={quote(str(self.cert))}"
        )


def makeTLSFiles(
    directory: Path,
    names: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1", "::1"),
) -> TLSFiles:
    """
    Write a new CA and a server certificate for ``names`` and ``addresses``, signed by it, into
    ``directory`` (``ca.pem``, ``key.pem``, ``cert.pem``). Valid from yesterday to tomorrow.
    """
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wschat test CA")])
    caCert = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), False)
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    subject = names[0] if names else addresses[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()), False
        )
        .sign(caKey, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.pem", directory / "key.pem", directory / "cert.pem")
    files.ca.write_bytes(caCert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files
