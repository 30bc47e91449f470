"""One process at a time: an exclusive ``flock`` on a lock file, released when its process ends (even by
``kill -9``); the file names the holder's pid for the message of whoever is refused."""
from __future__ import annotations

import os
import time
from pathlib import Path


def hold_lock(path: Path, timeout_s: float = 0.0) -> tuple[int, str | None]:
    """Take the lock ``path`` (created if missing), waiting up to ``timeout_s`` for its holder to let go.
    Returns ``(fd, None)``; keep ``fd`` open to hold it (``os.close`` releases it). When another process
    still holds it, ``(-1, its pid)``."""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                return -1, holder
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, None
