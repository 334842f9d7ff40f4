"""TLS: the client trusts a given CA, checks a given server name, and presents a client
certificate when the server demands one. Certificates are made per test run with openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from client import Client, ConnectOptions, MagiError, RetryPolicy, TlsOptions
from client.cli import main
from tests.client.fakes import FakeServer, Script

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to make test certificates"
)
NAME = "magi.test"  # the server certificate's name; the loopback address is not in it
ONCE = RetryPolicy(max_attempts=1)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(folder: Path, name: str) -> None:
    """folder/name.key + folder/name.pem, signed by folder/ca."""
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    (folder / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=magistream test CA",
        cwd=folder,
    )
    issue(folder, NAME)
    issue(folder, "client")
    return folder


def server_credentials(pki: Path, require_client: bool) -> grpc.ServerCredentials:
    pair = ((pki / f"{NAME}.key").read_bytes(), (pki / f"{NAME}.pem").read_bytes())
    return grpc.ssl_server_credentials(
        [pair], root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=require_client
    )


def test_client_trusts_the_given_ca_and_checks_the_given_server_name(pki):
    with FakeServer(Script(), server_credentials(pki, False)) as target:
        tls = TlsOptions(ca_file=pki / "ca.pem", server_name=NAME)
        with Client(ConnectOptions(target=target, tls=tls, retry=ONCE)) as client:
            assert client.list_models().default_model == "fake"
        wrong = TlsOptions(ca_file=pki / "ca.pem", server_name="other.test")
        with Client(ConnectOptions(target=target, tls=wrong, retry=ONCE)) as client:
            with pytest.raises(MagiError) as caught:
                client.list_models()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_the_client_certificate(pki):
    with FakeServer(Script(), server_credentials(pki, True)) as target:
        bare = TlsOptions(ca_file=pki / "ca.pem", server_name=NAME)
        with Client(ConnectOptions(target=target, tls=bare, retry=ONCE)) as client:
            with pytest.raises(MagiError):
                client.list_models()
        code = main(
            [
                "models",
                "--server",
                target,
                "--ca",
                str(pki / "ca.pem"),
                "--cert",
                str(pki / "client.pem"),
                "--key",
                str(pki / "client.key"),
                "--server-name",
                NAME,
                "--retries",
                "0",
            ]
        )
    assert code == 0
