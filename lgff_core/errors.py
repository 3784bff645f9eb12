"""User-facing errors. The CLI turns any `LGFFError` into one line on stderr and exit code 2.

Messages name the file / row / key and what is wrong, so a user can fix the input without a traceback.
"""


class LGFFError(Exception):
    """Base class of every error caused by bad input or configuration (not by a bug)."""


class DataError(LGFFError):
    """A dataset, shard, image or annotation is missing, malformed or inconsistent."""


class StorageError(LGFFError):
    """A URI cannot be read or written (missing object, permission, unreachable endpoint)."""


class CheckpointError(LGFFError):
    """A checkpoint is missing, not safetensors, or does not match the model it is loaded into."""


class IndexError_(LGFFError):
    """An index, its id map, or a search request is inconsistent."""
