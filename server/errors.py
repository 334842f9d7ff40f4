"""The service's errors and the one table that maps them to gRPC status codes.

Handlers raise these; `server.interceptors` turns them into the call's status. Every message
says what to change.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error the client can act on; the subclass fixes the status code."""

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class InvalidRequest(ServiceError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SessionNotFound(ServiceError):
    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is unknown (never started here, or ended long enough ago "
            "to be forgotten)"
        )


class SessionExists(ServiceError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session_id {session_id!r} is in use; pick another id or leave it empty")


class ServerFull(ServiceError):
    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(f"{message}; retry in about {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after-ms", str(self.retry_after_ms)),)


class NotSteerable(ServiceError):
    """A prompt for a session that ended or has no chunk left to steer."""


class NotForkable(ServiceError):
    """A fork at a chunk the source's fork history does not hold (or of a session forgotten)."""


class ResumeNotFound(ServiceError):
    """No snapshot of the caller's under that token."""


class SnapshotUnusable(ServiceError):
    """No store, no boundary yet, a changed file, another model's snapshot."""


class Unavailable(ServiceError):
    """The worker is down or restarting, or the server is shutting down."""


class SessionFailed(ServiceError):
    """A session ended with a non-OK status; its stream ends with that status. `resume`: the
    snapshot it was written to on the way out (a drain), sent in the trailing metadata as
    x-resume-token and x-resume-from-chunk so that the client can continue it elsewhere."""

    def __init__(
        self, code: grpc.StatusCode, message: str, resume: tuple[str, int] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.resume = resume

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.resume is None:
            return ()
        token, from_chunk = self.resume
        return (("x-resume-token", token), ("x-resume-from-chunk", str(from_chunk)))


STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    SessionExists: grpc.StatusCode.ALREADY_EXISTS,
    ServerFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotSteerable: grpc.StatusCode.FAILED_PRECONDITION,
    NotForkable: grpc.StatusCode.FAILED_PRECONDITION,
    SnapshotUnusable: grpc.StatusCode.FAILED_PRECONDITION,
    ResumeNotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    if isinstance(error, SessionFailed):
        return error.code
    return STATUS[type(error)]
