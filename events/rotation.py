"""Size-bounded files the agent appends lines to, rotated by the standard library.

The rotation is ``logging.handlers.RotatingFileHandler``'s: when a line would take ``path`` past
``max_bytes``, ``path.<backups-1>`` becomes ``path.<backups>`` (the oldest is dropped), ...,
``path`` becomes ``path.1``, and a new ``path`` is begun. So at most ``(backups + 1) * max_bytes``
bytes are kept, and the files read oldest first are ``path.<n>, ..., path.1, path``
(``rotated_files``). The handler is used as a line writer, not for log records: a write that
fails raises (the caller decides what a lost line means), files are 0600 like every file in the
state directory, and the directory is fsync'd after a rotation so that the renames survive a
crash together with what is written next.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
from pathlib import Path

from events.privatefiles import open_private

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_BACKUPS = 4


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    def _open(self) -> io.TextIOWrapper:
        fd = open_private(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115

    def doRollover(self) -> None:  # noqa: N802 - the standard library's name
        super().doRollover()
        _fsync_dir(Path(self.baseFilename).parent)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802, ARG002
        raise  # noqa: PLE0704 - called inside emit's except block: the write's own error


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RotatingLines:
    """Lines appended to ``path``, rotated at ``max_bytes`` keeping ``backups`` older files."""

    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        if max_bytes <= 0 or backups < 1:
            # RotatingFileHandler would never rotate: the file would grow without bound
            raise ValueError("a rotated file needs max_bytes > 0 and backups >= 1")
        self.path = path
        self._handler = _PrivateRotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", errors="replace"
        )

    def write(self, line: str) -> None:
        """Append ``line`` (a newline is added), rotating first if it would not fit; flushed to
        the kernel on return. Raises OSError."""
        self._handler.handle(logging.makeLogRecord({"msg": line}))

    def fsync(self) -> None:
        with self._handler.lock:  # type: ignore[union-attr]
            stream = self._handler.stream
            if stream is not None:
                os.fsync(stream.fileno())

    def close(self) -> None:
        self._handler.close()


def rotate_if_larger(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` as RotatingLines would, now, if it holds ``max_bytes`` or more: for a file
    another process writes (opened anew at each of its starts). True if it was rotated."""
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    handler = _PrivateRotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=max(backups, 1), delay=True
    )
    try:
        handler.doRollover()
    finally:
        handler.close()
    # doRollover begins a new file only when not delayed: the writer creates it
    return True


def rotated_files(path: Path) -> list[Path]:
    """``path`` and its rotated predecessors that exist, oldest first: ``path.<n>`` ... ``path.1``,
    ``path``. Read in this order they are one stream."""
    pattern = re.compile(re.escape(path.name) + r"\.([0-9]+)")
    older: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and entry.is_file():
            older.append((int(m.group(1)), Path(entry.path)))
    files = [p for _, p in sorted(older, reverse=True)]
    if path.exists():
        files.append(path)
    return files
