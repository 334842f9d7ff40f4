"""The snapshot file's header, readable without torch (the server checks a snapshot before the
engine sees it; engine/snapshot.py writes and reads the whole file)."""

from __future__ import annotations

import json
import struct

FORMAT = "magistream-snapshot"
VERSION = 1


class SnapshotError(ValueError):
    """A snapshot that cannot be resumed here; the message says why."""


def header_of(data: bytes) -> dict:
    """The JSON metadata of a snapshot file, read without torch (the server checks it)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        meta = json.loads(header["__metadata__"]["magistream"])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"not a magistream snapshot ({type(e).__name__})") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int):
        raise SnapshotError("not a magistream snapshot")
    if meta["version"] > VERSION:
        raise SnapshotError(
            f"snapshot format version {meta['version']} is newer than this server's ({VERSION}); "
            "resume it on a server at least as new as the one that wrote it"
        )
    return meta
