"""What a user can cause, as exception types: the CLI prints these as one line (exit 2) and
lets every other exception keep its traceback, so a bug is never hidden behind a polite
message. Raise them where bad input is detected, with a message that names what to fix.

UserError is the base. The subclasses that are also ValueError/TypeError/RuntimeError keep
`except ValueError` in callers of the Python API working as before.

Operating-system errors on a user's path (permission, is a folder, exists, no space left)
are the standard OSError subclasses; `describe_os_error` writes them as one line naming the
path and the cause.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager


class UserError(Exception):
    """Caused by what the user gave (options, files, folders, the machine): one line, exit 2."""


class InputError(UserError, ValueError):
    """A value, file content or combination of options that cannot be used."""


class InputTypeError(UserError, TypeError):
    """A value of the wrong kind (a Python API argument or a field in a file)."""


class SpecError(InputError):
    """A model spec that is malformed or outside what the engine can run."""


class RunStateError(InputError):
    """A resumable run's checkpoint folder that cannot be trusted (corrupt or tampered)."""


class ResourceLimitError(InputError):
    """An input too large to handle (a file, a nesting depth, a model's memory)."""


class BusyError(UserError):
    """Another process is writing the same output."""


class NoDeviceError(InputError):
    """The requested device is not present on this machine."""


# Standard OSErrors whose cause the user can fix; every other OSError keeps its traceback.
def is_int(value) -> bool:
    """Whether a user's value is an integer: an int that is not a bool (bool subclasses int,
    and a True width or count is always a mistake). The one such check, wherever counts,
    widths and sizes are checked."""
    return isinstance(value, int) and not isinstance(value, bool)


USER_OS_ERRNOS = {
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EISDIR: "is a folder, a file was expected",
    errno.EEXIST: "already exists",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOTEMPTY: "folder not empty",
}


def is_user_os_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in USER_OS_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """One line: the path(s) and the cause. Messages the project wrote itself (no errno)
    are returned as they are."""
    if exc.errno is None:
        return str(exc)
    cause = USER_OS_ERRNOS.get(exc.errno) or exc.strerror or os.strerror(exc.errno)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(paths)
    return f"{where}: {cause}" if where else cause


_WORKER_MARK = " in DataLoader worker process "


@contextmanager
def worker_errors_unwrapped():
    """A UserError raised in a DataLoader worker reaches the main process re-made from torch's
    text ("Caught InputError in DataLoader worker process 0. Original Traceback ..."): give
    the user back the original message, one line, as with --num-workers 0."""
    try:
        yield
    except UserError as err:
        text, cls = str(err), type(err)
        head = f"{cls.__module__}.{cls.__qualname__}: "
        at = text.rfind(head)
        if _WORKER_MARK not in text.split("\n", 1)[0] or at < 0:
            raise
        raise cls(text[at + len(head):].strip()) from None
