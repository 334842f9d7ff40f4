"""magi-client's exit codes, and how a failed call maps to one.

Shared by the argument side (client.cli) and the commands (client.commands); it imports
neither, so the CLI's modules import one way: cli -> commands -> exits.
"""

from __future__ import annotations

import sys

import grpc

from client.events import MagiError

EXIT_OK, EXIT_LOCAL, EXIT_USAGE, EXIT_REFUSED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
# The server answered and said no: what to change is in the message. Everything else
# (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, INTERNAL, ...) means the call itself failed.
REFUSED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def exit_code(code: grpc.StatusCode) -> int:
    return EXIT_REFUSED if code in REFUSED else EXIT_FAILED


def report(error: MagiError) -> int:
    """Prints the status code and the server's message; returns the exit code."""
    print(f"magi-client: {error.code.name}: {error.message}", file=sys.stderr)
    return exit_code(error.code)
