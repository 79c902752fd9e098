"""Files written atomically: a temporary file in the same folder, fsync, then a rename over the
target, so a kill or a full disk mid-write leaves the previous file as it was."""
from __future__ import annotations

import os
import tempfile

TEMP_PREFIX = ".tmp-"


def readable_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's files are private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str, data: bytes) -> None:
    """`data` at `path`, all or nothing (the folder must exist)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
