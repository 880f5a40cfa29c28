"""Errors a user sees: one sentence that names the file, tensor or setting at fault."""


class MerError(Exception):
    """A user-facing failure. `str(err)` is the whole message: one line, no traceback needed."""


class ModelFormatError(MerError):
    """A model file is missing, truncated, malformed, or describes something mer cannot run."""
