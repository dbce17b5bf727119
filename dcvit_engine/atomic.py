"""Write a file or a folder so that readers see either the old one or the complete new one,
never a half-written one: write to a temporary sibling, then rename it over the target.

The temporary sibling is removed whatever ends the block: an exception, Ctrl-C or SIGTERM
(the CLI raises SIGTERM as an interrupt). An OSError on the temporary path (a full disk, a
permission) is re-raised naming the target, the path the user gave."""
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # write() raises them without a file name


def _raise_for_target(err: BaseException, temporary, target: Path) -> None:
    """An OSError about the temporary path (or a full disk while writing it), re-raised about
    `target`, with the same type and cause."""
    if not isinstance(err, OSError) or err.errno is None:
        return
    if (err.filename is None and err.errno in _WRITE_ERRNOS) or \
            (err.filename is not None and str(err.filename).startswith(str(temporary))):
        raise type(err)(err.errno, err.strerror, str(target)) from None


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside `path` for a writer that takes a file name (savefig,
    safetensors); renamed to `path` if the block succeeds, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    except OSError as err:
        _raise_for_target(err, path.parent / f".{path.name}.tmp-", path)
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _raise_for_target(err, tmp, path)
        raise


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write a matplotlib figure as a PNG atomically (never a half-written plot), then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """open() for writing, made atomic as above; the data is flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def removed_if_left_empty(path: str | os.PathLike):
    """For a command that creates the output folder `path` as it goes: when the block raises
    (or is interrupted) and `path` did not exist before and is still empty, it is removed, so
    a failure before anything was produced leaves no empty folder behind."""
    path = Path(path)
    existed = path.exists() or path.is_symlink()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yields an empty staging folder beside `path`; when the block succeeds it replaces
    `path` (an existing folder is moved aside first, and put back if the final rename
    fails, so a complete folder is always there); when the block raises it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        _raise_for_target(err, path.parent / f".{path.name}.tmp-", path)
        raise
    try:
        yield staging
        _swap_into_place(staging, path)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        _raise_for_target(err, staging, path)
        raise


def _swap_into_place(staging: Path, path: Path) -> None:
    # rename() cannot replace a non-empty folder: move the old one aside first.
    if not path.exists():
        os.replace(staging, path)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(retired)
    os.replace(path, retired)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(retired, path)
        raise
    shutil.rmtree(retired, ignore_errors=True)
