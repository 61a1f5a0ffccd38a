"""Files only the agent's user may read: the state directory (0700) and what the agent keeps in it,
its journal and Kafka spool (0600).

Why: the state directory holds the pgpass file with the replication and superuser passwords, and
the journal and spool hold every input the agent saw (member addresses, the cluster's settings).
Nobody else on the node, and no other container sharing the volume's group, has a reason to read
them. A directory or file that exists with wider permissions (created by an older version, or
widened by a volume's fsGroup handling) is narrowed when the agent opens it, with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dir(path: Path | str, owner: tuple[int, int] | None = None) -> Path:
    """Create ``path`` (and missing parents) with mode 0700, or narrow an existing directory to
    0700. Parents are created with the default mode: they may be shared mount points.

    ``owner`` (uid, gid): give the directory to that user, for an agent that runs as root and
    PostgreSQL as another user, which must read the pgpass file in the state directory."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if owner is not None:
        st = os.stat(path)
        if (st.st_uid, st.st_gid) != owner:
            os.chown(path, *owner)
    _narrow(path, os.stat(path).st_mode, PRIVATE_DIR_MODE, lambda m: os.chmod(path, m))
    return path


def open_private(path: Path | str, flags: int) -> int:
    """``os.open`` of a file that is created 0600, and narrowed to 0600 if it already exists with
    wider permissions. Returns the descriptor."""
    path = Path(path)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        _narrow(path, os.fstat(fd).st_mode, PRIVATE_FILE_MODE, lambda m: os.fchmod(fd, m))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _narrow(path: Path, st_mode: int, want: int, chmod: Callable[[int], None]) -> None:
    mode = stat.S_IMODE(st_mode)
    if mode & ~want == 0:
        return
    log.warning("narrowing the permissions of %s from %o to %o", path, mode, mode & want)
    try:
        chmod(mode & want)
    except PermissionError as exc:
        raise PermissionError(
            f"{path} has mode {mode:o} (others may read it) and cannot be narrowed to "
            f"{mode & want:o}: {exc.strerror}; make the agent's user its owner"
        ) from None
