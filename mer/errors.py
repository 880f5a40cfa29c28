"""Errors a user sees: one sentence that names the file, tensor or setting at fault."""

from __future__ import annotations

import errno


class MerError(Exception):
    """A user-facing failure. `str(err)` is the whole message: one line, no traceback needed."""


class ModelFormatError(MerError):
    """A model file is missing, truncated, malformed, or describes something mer cannot run."""


class ParamError(MerError, ValueError):
    """A setting out of range. `name` is the setting's name as the API spells it (`top_p`), so
    that each front end can name it its own way (`--top-p` on the command line)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.name = name
        self.message = message  # the text after the name


# What to do about the operating-system errors a user can fix.
_ADVICE = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a file is in the way where a directory should be",
    errno.EISDIR: "it is a directory, a file was expected",
    errno.ENOSPC: "free some disk space or choose another disk",
    errno.EDQUOT: "free some disk space or raise the quota",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error_text(err: OSError, path: object = None) -> str:
    """One line for an operating-system error: the file, what went wrong, what to do."""
    where = err.filename if err.filename is not None else path
    what = (err.strerror or str(err)).rstrip(".")
    text = f"{what.lower()}" if where is None else f"{where}: {what.lower()}"
    advice = _ADVICE.get(err.errno or 0)
    return f"{text} ({advice})" if advice else text
