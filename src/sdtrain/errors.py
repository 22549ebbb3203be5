"""The errors a user can act on, told apart from bugs.

One rule for every front end: an error the user can act on is a :class:`UserError` whose message is one line (which
file, what is wrong, what to do); ``sdtrain`` prints it and exits 2. Anything else is a bug: the command line says so
in one line and writes the traceback to a file it names (:mod:`sdtrain.cli`). The errors of each layer subclass
:class:`UserError` where they are defined (``ConfigError``, ``DataError``, ``CheckpointError``, ...).

A write that fails for want of space (a full disk, a quota, a file size limit, a read-only or forbidden folder) is
the user's to act on too, but the libraries that write report it each their own way: Python as an ``OSError``,
safetensors as a ``SafetensorError`` saying "os error 28", ``torch.save`` as a ``RuntimeError`` raised while an
``OSError`` is handled. :func:`failed_write` finds the operating system's error behind any of them.

This module imports nothing of sdtrain's, so every layer can use it.
"""

from __future__ import annotations

import errno
import os
import re

# what a write can fail with that the user, not sdtrain, can mend
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """An error the user can act on: ``sdtrain`` prints its message as one line and exits 2."""


class MissingPackage(UserError, ImportError):
    """An optional package a setting needs is not installed; the message says what to pip install."""


class StorageError(UserError):
    """A file that could not be written (full disk, quota, file size limit, permissions); what was written before is
    intact, and the message says where the run goes on from."""


class Unsupported(UserError, ValueError):
    """A request sdtrain cannot do as asked (a model without an image-to-image pipeline, a launch it cannot train
    under); the message says what it can do."""


class Diverged(UserError, RuntimeError):
    """Training stopped on non-finite losses, gradients or weights; the newest checkpoint holds finite weights."""


_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def in_chain(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` among ``error``, its cause and its context (a library that caught it while
    loading may have raised its own error from it); None where there is none."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        current = current.__cause__ or current.__context__
    return None


def failed_write(error: BaseException) -> OSError | None:
    """The operating system's error behind ``error`` when it is a write that failed for want of space or permission
    (:data:`WRITE_ERRNOS`), wherever the library that wrote put it: the error itself, its cause or context (as
    ``torch.save`` into a file object leaves it), or "os error N" in its message (safetensors); None otherwise."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current
        match = _OS_ERROR.search(str(current))
        if match:
            number = int(match.group(1) or match.group(2))
            if number in WRITE_ERRNOS:
                return OSError(number, os.strerror(number))
        current = current.__cause__ or current.__context__
    return None


def describe_os_error(error: OSError) -> str:
    """``[Errno 28] No space left on device`` without the file name Python appends (the caller names the file)."""
    return f"[Errno {error.errno}] {error.strerror or os.strerror(error.errno or 0)}"
