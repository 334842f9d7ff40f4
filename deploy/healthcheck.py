"""Container health check: exit 0 when the local server's grpc.health.v1 says SERVING.

Used by the Dockerfile's HEALTHCHECK, and by the Kubernetes probes when the gRPC port speaks
TLS (deploy/components/tls): the kubelet's native gRPC probe speaks plaintext only (before
Kubernetes 1.37) and never presents a client certificate. It reads the server's own
settings, so one setting moves both:

  MAGISTREAM_PORT                     the port on 127.0.0.1 (default 50051)
  MAGISTREAM_TLS_CERT                 set: speak TLS (the server's --tls-cert)
  MAGISTREAM_HEALTHCHECK_CA           the CA that signed the server certificate (default:
                                      MAGISTREAM_TLS_CERT itself, right for a self-signed one)
  MAGISTREAM_HEALTHCHECK_SERVER_NAME  a name the certificate carries (default: the address)
  MAGISTREAM_HEALTHCHECK_CERT/_KEY    a client certificate to present, for servers that ask
                                      for one at the handshake (mTLS)

Health needs no credentials, so no token is sent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(address: str, env: Mapping[str, str]) -> grpc.Channel:
    """A plaintext channel, or a TLS one when the server has a certificate."""
    cert = env.get("MAGISTREAM_TLS_CERT")
    if not cert:
        return grpc.insecure_channel(address)
    ca = Path(env.get("MAGISTREAM_HEALTHCHECK_CA") or cert).read_bytes()
    client_cert, client_key = (
        env.get("MAGISTREAM_HEALTHCHECK_CERT"),
        env.get("MAGISTREAM_HEALTHCHECK_KEY"),
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )
    name = env.get("MAGISTREAM_HEALTHCHECK_SERVER_NAME")
    options = (("grpc.ssl_target_name_override", name),) if name else ()
    return grpc.secure_channel(address, credentials, options=options)


def main(env: Mapping[str, str] = os.environ) -> int:
    address = f"127.0.0.1:{env.get('MAGISTREAM_PORT', '50051')}"
    try:
        opened = channel(address, env)
    except OSError as e:  # a certificate file missing: say which
        print(f"health check of {address}: {e}", file=sys.stderr)
        return 1
    with opened:
        try:
            reply = health_pb2_grpc.HealthStub(opened).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3
            )
        except grpc.RpcError as e:
            print(f"health check of {address}: {e.code().name} {e.details()}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"health check of {address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
