"""Who is calling: transport credentials, bearer tokens, protected mode, and the principal.

A call's principal is the name its credentials map to: a bearer token's entry in the tokens
file, else the common name of its client certificate (mutual TLS). With no credentials
configured the server is in protected mode: loopback clients are served (as `anonymous`), others
are refused, unless `--insecure` says to serve everyone. Health is always open (probes need it).

Tokens and certificates are files an operator rotates (a Kubernetes Secret update, a cert-manager
renewal): `Credentials.reload_if_changed()` re-reads them when their modification time changes
(and on SIGHUP); a file that fails to load leaves the previous one in force.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from engine.logs import event
from server.config import Security
from server.interceptors import rewrapped
from server.metrics import Metrics

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the principal of every call when no credentials are configured
PRINCIPAL = re.compile(r"[A-Za-z0-9._@:+-]{1,128}")
MIN_TOKEN_CHARS = 16  # shorter tokens are guessable; `openssl rand -hex 32` gives 64
# Methods anyone may call: load balancers and kubelet probe health without credentials.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# The principal of the call being handled; set by AuthInterceptor, read by the servicer.
current_principal: contextvars.ContextVar[str] = contextvars.ContextVar("principal")


class TokenFileError(ValueError):
    """A tokens file that cannot be used; the message names the line, never a token."""


@dataclass(frozen=True)
class TokenTable:
    """sha256(token) -> principal. Lookups compare against every entry in constant time."""

    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def parse(cls, text: str, source: str) -> TokenTable:
        entries: list[tuple[bytes, str]] = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenFileError(f"{source} line {n}: expected `TOKEN PRINCIPAL`")
            token, principal = parts
            if len(token) < MIN_TOKEN_CHARS:
                raise TokenFileError(
                    f"{source} line {n}: the token is shorter than {MIN_TOKEN_CHARS} characters "
                    "(make one with `openssl rand -hex 32`)"
                )
            if not PRINCIPAL.fullmatch(principal):
                raise TokenFileError(
                    f"{source} line {n}: principal {principal!r} must be 1-128 characters of "
                    "[A-Za-z0-9._@:+-]"
                )
            digest = hashlib.sha256(token.encode()).digest()
            if any(hmac.compare_digest(digest, d) for d, _ in entries):
                raise TokenFileError(f"{source} line {n}: the same token appears twice")
            entries.append((digest, principal))
        if not entries:
            raise TokenFileError(f"{source}: no tokens (expected `TOKEN PRINCIPAL` lines)")
        return cls(tuple(entries))

    def principal(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, principal in self.entries:  # no early exit: timing says nothing
            if hmac.compare_digest(digest, known):
                found = principal
        return found


@dataclass(frozen=True)
class Denied:
    """Why a call is refused: a metrics label and a message that says what to do."""

    reason: str  # missing, invalid_token, not_loopback, no_client_cert, scrape_only, no_metrics
    message: str
    # the caller is known but may not do this (PERMISSION_DENIED / HTTP 403), rather than
    # unknown (UNAUTHENTICATED / HTTP 401)
    forbidden: bool = False


def is_loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:%5B::1%5D:5000`, `unix:/path`)
    is this machine. IPv4-mapped IPv6 addresses count as their IPv4 address."""
    # gRPC percent-encodes the brackets (and a zone id's `%`) of IPv6 peers: a client that
    # dials `localhost` reaches a `0.0.0.0` listener over [::1] and shows as `ipv6:%5B::1%5D:N`
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "unix" or kind == "unix-abstract":
        return True
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
    else:
        return False
    host = host.split("%", 1)[0]  # a zone id (fe80::1%eth0) is not part of the address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether an IP address (a socket peer's, `127.0.0.1` or `::1`) is this machine."""
    return is_loopback_peer(f"ipv6:[{host}]:0" if ":" in host else f"ipv4:{host}:0")


def bearer_token(value: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Credentials:
    """What the server checks callers against, reloadable. One per server process."""

    def __init__(self, security: Security) -> None:
        self.security = security
        self.tokens: TokenTable | None = None
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._cert_config: grpc.ServerCertificateConfiguration | None = None
        self._cert_config_pending = False
        self._ssl_context: ssl.SSLContext | None = None
        self.load()

    @property
    def protected(self) -> bool:
        """No credentials and not --insecure: loopback clients only."""
        return not self.security.credentials_configured and not self.security.insecure

    # ---- loading ----------------------------------------------------------------------

    def load(self) -> None:
        """Read every configured file; raises ValueError on the first unusable one (at start)."""
        s = self.security
        if s.auth_tokens is not None:
            source = f"--auth-tokens {s.auth_tokens}"
            self.tokens = TokenTable.parse(_read_text(s.auth_tokens), source)
        if s.tls_cert is not None:
            try:
                self._ssl_context = self._make_ssl_context()
                self._cert_config = self._grpc_cert_config()
            except (OSError, ssl.SSLError) as e:  # a missing file, or a key that does not match
                raise ValueError(
                    f"--tls-cert {s.tls_cert} / --tls-key {s.tls_key}"
                    + (f" / --tls-client-ca {s.tls_client_ca}" if s.tls_client_ca else "")
                    + f": cannot load them ({e})"
                ) from e
        self._stamps = {path: _stamp(path) for path in self._files()}

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the files if any changed (or `force`, on SIGHUP); whether they were. A file
        that fails to load is logged and the previous credentials stay in force."""
        stamps = {path: _stamp(path) for path in self._files()}
        if not force and stamps == self._stamps:
            return False
        self._stamps = stamps  # a broken file is reported once, not on every check
        try:
            old = self._cert_config
            self.load()
            self._cert_config_pending = self._cert_config is not old
        except ValueError as e:
            event(logger, "auth.reload_failed", level=logging.ERROR, error=str(e))
            return False
        event(logger, "auth.reloaded", files=len(stamps))
        return True

    def _files(self) -> list[Path]:
        s = self.security
        return [p for p in (s.auth_tokens, s.tls_cert, s.tls_key, s.tls_client_ca) if p]

    def _grpc_cert_config(self) -> grpc.ServerCertificateConfiguration:
        s = self.security
        assert s.tls_cert is not None and s.tls_key is not None
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        pair = (s.tls_key.read_bytes(), s.tls_cert.read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def _make_ssl_context(self) -> ssl.SSLContext:
        s = self.security
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        if s.tls_client_ca is not None:
            context.load_verify_locations(str(s.tls_client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    # ---- serving ----------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for the gRPC port (None = plaintext). The certificate is fetched again at each
        handshake, so a reload applies to new connections without a restart."""
        if self._cert_config is None:
            return None
        return grpc.dynamic_ssl_server_credentials(
            self._cert_config,
            self._fetch_cert_config,
            require_client_authentication=self.security.tls_client_ca is not None,
        )

    def _fetch_cert_config(self) -> grpc.ServerCertificateConfiguration | None:
        if not self._cert_config_pending:
            return None
        self._cert_config_pending = False
        return self._cert_config

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS for the metrics port: the current context (a reload makes a new one)."""
        return self._ssl_context

    def following_ssl_context(self) -> ssl.SSLContext | None:
        """TLS for a port served by asyncio (the HTTP port): a context whose every handshake
        switches to the current one, so a reloaded certificate applies to new connections.
        Python calls the SNI callback on every handshake, with or without a server name."""
        first = self._ssl_context
        if first is None:
            return None
        following = self._make_ssl_context()

        def newest(connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            current = self._ssl_context
            if current is not None:
                connection.context = current

        following.sni_callback = newest
        return following

    def check_grpc(self, method: str, context: grpc.aio.ServicerContext) -> str | Denied:
        """The principal of a call, or why it is refused."""
        if self.protected:  # decided by the address alone: nothing else is read
            return self.check_service(is_loopback_peer(context.peer()), None, None)
        metadata = dict(context.invocation_metadata() or ())
        names = context.auth_context().get("x509_common_name")
        return self.check_service(
            False, metadata.get("authorization"), names[0].decode() if names else None
        )

    def check_service(
        self, loopback: bool, authorization: str | None, common_name: str | None
    ) -> str | Denied:
        """Who may use the service (gRPC and the WebSocket API alike): from whether the peer is
        this machine, its `authorization` value and its verified certificate's common name."""
        if self.protected:
            return ANONYMOUS if loopback else self._protected_denial()
        decision = self._decide(authorization, common_name)
        s = self.security
        if decision in s.metrics_principals and decision not in s.admin_principals:
            return Denied(
                "scrape_only",
                f"principal {decision!r} may only read the metrics port (--metrics-principals); "
                "use another principal's credentials for the service",
                forbidden=True,
            )
        return decision

    def check_http(
        self, peer_host: str, authorization: str | None, cert: dict | None
    ) -> str | Denied:
        """The same decision for the metrics port (peer address, header, verified cert)."""
        if self.protected:
            return ANONYMOUS if is_loopback_host(peer_host) else self._protected_denial()
        decision = self._decide(authorization, common_name(cert))
        s = self.security
        allowed = (*s.metrics_principals, *s.admin_principals, ANONYMOUS)
        if isinstance(decision, str) and decision not in allowed:
            return Denied(
                "no_metrics",
                f"principal {decision!r} may not read metrics; the operator lists scrapers in "
                "--metrics-principals",
                forbidden=True,
            )
        return decision

    def _decide(self, authorization: str | None, common_name: str | None) -> str | Denied:
        s = self.security
        if not s.credentials_configured:  # --insecure
            return ANONYMOUS
        if authorization is not None and self.tokens is not None:
            token = bearer_token(authorization)
            principal = self.tokens.principal(token) if token else None
            if principal is None:
                return Denied(
                    "invalid_token",
                    "the bearer token is not valid here; check the `authorization: Bearer "
                    "<token>` metadata (magi-client --token or MAGISTREAM_TOKEN)",
                )
            return principal
        if common_name is not None and s.tls_client_ca is not None:
            return common_name
        if s.tls_client_ca is not None and self.tokens is None:
            return Denied("no_client_cert", "a client certificate with a common name is required")
        return Denied(
            "missing",
            "this server requires credentials: send `authorization: Bearer <token>` metadata "
            "(magi-client --token or MAGISTREAM_TOKEN)"
            + (" or a client certificate" if s.tls_client_ca else ""),
        )

    @staticmethod
    def _protected_denial() -> Denied:
        return Denied(
            "not_loopback",
            "this server has no credentials configured and serves loopback clients only "
            "(protected mode); its operator must set --auth-tokens or --tls-client-ca, or "
            "--insecure 1 to serve every address without credentials",
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise TokenFileError(f"cannot read {path}: {e.strerror}") from e


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def common_name(cert: dict | None) -> str | None:
    """The subject CN of a certificate as ssl.SSLSocket.getpeercert() gives it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call before its handler runs and makes its principal
    `current_principal`. Refusals end with UNAUTHENTICATED and are counted by reason (and, like
    every call, in magistream_grpc_calls)."""

    def __init__(self, credentials: Credentials, metrics: Metrics, open_reflection: bool) -> None:
        self.credentials = credentials
        self.metrics = metrics
        self.open_prefixes = OPEN_PREFIXES + (REFLECTION_PREFIXES if open_reflection else ())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        return rewrapped(
            handler,
            lambda kind, behavior: (self._stream if kind.endswith("_stream") else self._unary)(
                method, behavior
            ),
        )

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        decision = self.credentials.check_grpc(method, context)
        if isinstance(decision, Denied):
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if decision.forbidden
                else grpc.StatusCode.UNAUTHENTICATED
            )
            self.metrics.auth_failures.labels(decision.reason).inc()
            self.metrics.grpc_calls.labels(method, code.name).inc()
            event(logger, "rpc.unauthenticated", method=method, reason=decision.reason)
            await context.abort(code, decision.message)
        current_principal.set(decision)

    def _unary(self, method: str, behavior: Callable) -> Callable:
        async def unary(request, context):
            await self._admit(method, context)
            return await behavior(request, context)

        return unary

    def _stream(self, method: str, behavior: Callable) -> Callable:
        async def stream(request, context):
            await self._admit(method, context)
            async for response in behavior(request, context):
                yield response

        return stream
