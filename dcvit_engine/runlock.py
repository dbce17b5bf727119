"""One writer per output: a process writing OUT holds an exclusive lock on OUT.partial, so a
second process given the same --out refuses at once, naming the first, instead of racing it
for the checkpoint folder. The lock is flock(2) on a file inside the folder: the kernel
releases it when the holder exits however it ends (a kill included), so a stale lock file
never blocks a later run or a resume."""
from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError, RunStateError

LOCK_FILENAME = ".lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return text or "another process"


def _acquire(lock: Path) -> int:
    """An open descriptor holding the exclusive lock on `lock` (created if needed)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BusyError(f"{lock.parent} is in use by {holder}, writing the same output; wait for it "
                            "to finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the folder as we opened it: lock the new one


@contextmanager
def exclusive_folder(folder: str | os.PathLike):
    """Holds the lock on `folder` (created if missing) for the block. If the block raises and
    leaves the folder holding only the lock file, and the folder was created here, it is
    removed: a run that fails before its first checkpoint leaves nothing behind."""
    folder = Path(folder)
    if folder.is_symlink():
        raise RunStateError(f"{folder} is a symbolic link; a run keeps its checkpoints in a folder of "
                            "its own: remove the link or choose another --out")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILENAME
    fd = _acquire(lock)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode(), 0)
        try:
            yield folder
        except BaseException:
            if created and folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCK_FILENAME]:
                lock.unlink()
                folder.rmdir()
            raise
    finally:
        os.close(fd)
