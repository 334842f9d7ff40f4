"""Structured logs: one logfmt line per event, `event=... session=... key=value ...`."""

from __future__ import annotations

import logging
import sys


def event(
    logger: logging.Logger,
    name: str,
    session: str | None = None,
    *,
    level: int = logging.INFO,
    **fields: object,
) -> None:
    if not logger.isEnabledFor(level):
        return
    pairs = [("event", name)] + ([("session", session)] if session is not None else [])
    pairs += [(k, v) for k, v in fields.items() if v is not None]
    logger.log(level, " ".join(f"{k}={_value(v)}" for k, v in pairs))


def _value(v: object) -> str:
    if isinstance(v, float):
        v = f"{v:.4g}"
    s = str(v)
    if not s or any(c in s for c in ' "=\n'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def configure(level: str) -> None:
    """Timestamp, level and logger before each logfmt line, on stderr (stdout carries the
    `listening on` lines tools read)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
