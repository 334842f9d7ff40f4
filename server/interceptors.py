"""One place where a call's outcome becomes its status: errors mapped, calls counted."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

import grpc

from engine.logs import event
from server.errors import ServiceError, status_of
from server.metrics import Metrics

logger = logging.getLogger(__name__)

# The server learns of a passed deadline by the call being cancelled, a moment before (or
# after) its own clock reaches the deadline; within this margin it counts as the deadline.
DEADLINE_MARGIN_S = 0.1


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_MARGIN_S


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
        method = details.method
        for kind, factory in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return factory(
                    self._wrap(method, behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

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


class _Outcome:
    """The status of one call, found from how its handler ended."""

    def __init__(self, owner: StatusInterceptor, method: str, context) -> None:
        self.owner, self.method, self.context = owner, method, context
        self.code: grpc.StatusCode | None = None

    def ok(self) -> None:
        self.code = self.context.code() or grpc.StatusCode.OK

    async def failed(self, error: BaseException) -> None:
        """Record the status and raise what gRPC needs to end the call with it."""
        if isinstance(error, ServiceError):
            self.code = status_of(error)
            await self.context.abort(self.code, str(error), error.trailing_metadata())
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            deadline = deadline_passed(self.context)
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline else grpc.StatusCode.CANCELLED
            raise error
        if isinstance(error, grpc.aio.AbortError):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            raise error
        self.code = grpc.StatusCode.INTERNAL
        event(
            logger, "rpc.internal_error", level=logging.ERROR, method=self.method, error=repr(error)
        )
        logger.error("unexpected error in %s", self.method, exc_info=error)
        await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error}")

    def record(self) -> None:
        code = self.code or grpc.StatusCode.CANCELLED
        self.owner.metrics.grpc_calls.labels(self.method, code.name).inc()
