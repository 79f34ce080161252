"""The one family of errors relufy raises; the CLI turns each into a one-line message."""

import errno

# how libraries that raise no OSError (safetensors, torch) say that the disk or the quota is full
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122", "StorageFull",
                   "file write failed")


class RelufyError(Exception):
    """Base class: the message says what is wrong and how to fix it."""

    exit_code = 2


class SourceError(RelufyError):
    """The source checkpoint is missing, unreadable or not a model."""


class UnsupportedArchitectureError(RelufyError):
    """The model_type has no entry in the architecture map."""


class AlreadyConvertedError(RelufyError):
    """The source already uses the requested activation."""

    exit_code = 3


class OutputExistsError(RelufyError):
    """The output may not be written there: it exists without --force, relufy did not write it, or it is,
    holds or lies inside an input of the command."""


class OutputInUseError(RelufyError):
    """Another relufy process is writing the same output."""


class OutputError(RelufyError):
    """The output cannot be written (permissions, read-only filesystem)."""


class ActivationError(RelufyError):
    """Unknown activation name or an invalid activation parameter."""


class DataError(RelufyError):
    """Text data is missing, empty or too short for the request."""


class RecipeError(RelufyError):
    """A training recipe is invalid."""


class TrainingError(RelufyError):
    """Training had to stop (non-finite loss, disk full, ...)."""


class ResultError(RelufyError):
    """A measurement came out NaN or infinite: an error, never a number in a table."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the disk or the quota is full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
