"""Python SDK and the magi-client CLI (depends only on proto, grpcio, protobuf, av)."""

from client.aio import AsyncClient, AsyncGenerateStream, AsyncInteractStream
from client.events import Ack, ChunkEvent, Finished, MagiError, Started
from client.options import ConnectOptions, GenerateOptions, RetryPolicy, TlsOptions
from client.sync import Client, GenerateStream, InteractStream

__all__ = [
    "Ack",
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncInteractStream",
    "ChunkEvent",
    "Client",
    "ConnectOptions",
    "Finished",
    "GenerateOptions",
    "GenerateStream",
    "InteractStream",
    "MagiError",
    "RetryPolicy",
    "Started",
    "TlsOptions",
]
