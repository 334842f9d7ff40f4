"""One place where a call's outcome becomes its status: errors mapped, calls counted."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from engine.logs import event
from server.errors import InvalidRequest, ServiceError, status_of
from server.metrics import Metrics

logger = logging.getLogger(__name__)

# The server learns of a passed deadline by the call being cancelled, a moment before (or
# after) its own clock reaches the deadline; within this margin it counts as the deadline.
DEADLINE_MARGIN_S = 0.1


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_MARGIN_S


_KEEP = object()
_FACTORIES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def rewrapped(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[str, Callable], Callable],
    request_deserializer: Callable | None | object = _KEEP,
) -> grpc.RpcMethodHandler:
    """`handler` with its behavior replaced by `wrap(kind, behavior)` (kind: unary_unary,
    unary_stream, stream_unary or stream_stream); its deserializer kept unless one is given."""
    for kind, factory in _FACTORIES:
        behavior = getattr(handler, kind)
        if behavior is not None:
            keep = request_deserializer is _KEEP
            return factory(
                wrap(kind, behavior),
                request_deserializer=handler.request_deserializer if keep else request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: ServiceError -> its status (errors.STATUS), anything unexpected ->
    INTERNAL (logged with its traceback), and each finished call counted by method and code."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        # the request arrives as bytes and is parsed inside the wrapper, so a message that does
        # not parse is INVALID_ARGUMENT and counted (gRPC itself would answer UNKNOWN before
        # any interceptor saw the call)
        return rewrapped(
            handler,
            lambda kind, behavior: self._wrap(
                details.method, _parsing(behavior, handler.request_deserializer, kind)
            ),
            request_deserializer=None,
        )

    def _wrap(self, method: str, behavior: Callable) -> Callable:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request, context):
                outcome = _Outcome(self, method, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                    outcome.ok()
                except BaseException as e:  # noqa: BLE001 - every exit is classified
                    await outcome.failed(e)
                finally:
                    outcome.record()

            return stream

        async def unary(request, context):
            outcome = _Outcome(self, method, context)
            try:
                result = await behavior(request, context)
                outcome.ok()
                return result
            except BaseException as e:  # noqa: BLE001
                await outcome.failed(e)
            finally:
                outcome.record()

        return unary


def _parsing(behavior: Callable, deserialize: Callable | None, kind: str) -> Callable:
    """The handler `behavior`, taking its request (or each message of a request stream) as raw
    bytes and parsing it first; the same kind of function (async generator or coroutine)."""
    if deserialize is None:
        return behavior
    streaming = kind.startswith("stream_")

    def parsed(request):
        return _parse_each(request, deserialize) if streaming else _parse(request, deserialize)

    if inspect.isasyncgenfunction(behavior):

        async def stream(request, context):
            # closed here, not left to the garbage collector: a disconnect reaches the
            # handler's own cleanup at once
            async with contextlib.aclosing(behavior(parsed(request), context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def unary(request, context):
        return await behavior(parsed(request), context)

    return unary


async def _parse_each(messages: AsyncIterator[bytes], deserialize: Callable) -> AsyncIterator:
    async for data in messages:
        yield _parse(data, deserialize)


def _parse(data: bytes, deserialize: Callable):
    try:
        return deserialize(data)
    except Exception as e:  # noqa: BLE001 - DecodeError, or whatever a deserializer raises
        kind = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        name = kind.full_name if kind is not None else "request message"
        why = str(e).rpartition(": ")[2] or type(e).__name__
        raise InvalidRequest(
            "request",
            f"the {len(data)} bytes received could not be parsed as a {name} ({why}); send a "
            f"serialized {name}",
        ) from e


class _Outcome:
    """The status of one call, found from how its handler ended."""

    def __init__(self, owner: StatusInterceptor, method: str, context) -> None:
        self.owner, self.method, self.context = owner, method, context
        self.code: grpc.StatusCode | None = None

    def ok(self) -> None:
        self.code = self.context.code() or grpc.StatusCode.OK

    async def failed(self, error: BaseException) -> None:
        """Record the status and raise what gRPC needs to end the call with it."""
        try:
            if isinstance(error, ServiceError):
                self.code = status_of(error)
                # The client's error needs no traceback, and the abort below is raised with this
                # error as its context: its frames (a request's decoded image among their locals)
                # would live as long as gRPC keeps the abort, in cycles only a full collection
                # finds.
                error.__traceback__ = None
                await self.context.abort(self.code, str(error), error.trailing_metadata())
            if isinstance(error, asyncio.CancelledError | GeneratorExit):
                deadline = deadline_passed(self.context)
                self.code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED if deadline else grpc.StatusCode.CANCELLED
                )
                raise error
            if isinstance(error, grpc.aio.AbortError):
                self.code = self.context.code() or grpc.StatusCode.UNKNOWN
                raise error
            self.code = grpc.StatusCode.INTERNAL
            event(
                logger,
                "rpc.internal_error",
                level=logging.ERROR,
                method=self.method,
                error=repr(error),
            )
            logger.error("unexpected error in %s", self.method, exc_info=error)
            await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")
        finally:
            # The raised error's traceback holds this frame: without this, error -> traceback
            # -> frame -> error is a cycle, and the whole call (its request, the image bytes)
            # waits for the cycle collector instead of going when the call ends.
            del error

    def record(self) -> None:
        code = self.code or grpc.StatusCode.CANCELLED
        self.owner.metrics.grpc_calls.labels(self.method, code.name).inc()
