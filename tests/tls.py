"""Throwaway certificates for tests, made with the openssl command line.

`make_pki(folder)` writes a CA, a server certificate signed by it for the names the shipped
configs expect (`magistream`, as deploy/components/tls issues it, with serverAuth and
clientAuth) and for localhost / 127.0.0.1 / ::1, client certificates (common names `alice`,
`bob`, `admin`) signed by it, and a client certificate from a second, untrusted CA (`mallory`).
Every file is PEM.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENTS = ("alice", "bob", "admin")


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def client_cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.folder / f"{name}.key"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ca(folder: Path, name: str, common_name: str | None = None) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", f"/CN={common_name or name} test CA",
        "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.csr",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", folder / f"{name}.csr", "-CA", folder / f"{ca}.pem",
        "-CAkey", folder / f"{ca}.key", "-CAcreateserial", "-days", "2", "-extfile", ext,
        "-out", folder / f"{name}.pem",
    )  # fmt: skip


def make_pki(folder: Path, name: str = "ca") -> Pki:
    """`name`: the CA's common name, so two sets can be told apart."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca", name)
    _ca(folder, "rogue")
    _leaf(
        folder,
        "server",
        "ca",
        "subjectAltName=DNS:magistream,DNS:localhost,IP:127.0.0.1,IP:::1\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n",
    )
    for name in CLIENTS:
        _leaf(folder, name, "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(folder, "mallory", "rogue", "extendedKeyUsage=clientAuth\n")
    return Pki(folder)
