"""Where snapshots live: a directory or an object-store URL, through fsspec.

`--snapshot-dir` names it: a path (on Kubernetes a shared volume) or any URL fsspec opens
(`s3://bucket/prefix` with s3fs installed, `memory://` in tests). A snapshot is one file,
`<id>.snapshot`; the resume token is `<id>.<sha256 of the file>`, so a token names exactly one
file's contents: a file changed or damaged in the store is refused, and the 128-bit random id
cannot be guessed. The file's header says whose it is (engine/snapshot_format.py).
"""

from __future__ import annotations

import hashlib
import re
import secrets

import fsspec

from engine.snapshot_format import SnapshotError, header_of

TOKEN = re.compile(r"([0-9a-f]{32})\.([0-9a-f]{64})")
# a token never written here and another principal's are refused in the same words
NOT_IN_STORE = (
    "no snapshot with that token in this server's store (was it written by a server that "
    "shares this --snapshot-dir?)"
)


class SnapshotNotFound(SnapshotError):
    """No snapshot under that token (never written here, or removed)."""


class SnapshotStore:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.fs.makedirs(self.root, exist_ok=True)

    def put(self, data: bytes) -> str:
        """Store a snapshot file; its resume token."""
        snapshot_id = secrets.token_hex(16)
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(snapshot_id)
        tmp = f"{path}.partial"
        with self.fs.open(tmp, "wb") as f:  # written whole, then renamed: never half a file
            f.write(data)
        self.fs.mv(tmp, path)
        return f"{snapshot_id}.{digest}"

    def get(self, token: str) -> tuple[bytes, dict]:
        """The snapshot a token names, checked against its checksum, and its header."""
        match = TOKEN.fullmatch(token)
        if match is None:
            raise SnapshotError(
                "not a resume token: SnapshotSession returns one (32 hex digits, a dot, 64 more)"
            )
        snapshot_id, digest = match.groups()
        try:
            with self.fs.open(self._path(snapshot_id), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SnapshotNotFound(NOT_IN_STORE) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise SnapshotError(
                "the snapshot's checksum does not match its token: the file was changed or "
                "damaged in the store"
            )
        return data, header_of(data)

    def _path(self, snapshot_id: str) -> str:
        return f"{self.root}/{snapshot_id}.snapshot"
