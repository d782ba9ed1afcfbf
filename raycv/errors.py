"""Domain errors. Each subclasses a built-in so callers can catch it generically, and says what to do."""

from __future__ import annotations


class RaycvError(Exception):
    """Base class of every error raycv raises on purpose."""


class ConfigError(RaycvError, ValueError):
    """An invalid configuration: names the field, the value that came and the fix.

    The CLI turns it into exit code 2 with no traceback.
    """

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}: got {value!r}. {fix}")


class UnknownModelError(RaycvError, ValueError):
    """A model name that is not in the registry."""


class DecodeError(RaycvError, ValueError):
    """Bytes that cannot be decoded into an image. Carries the URI and the reason."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"cannot decode {uri or '<bytes>'}: {reason}")


class DatasetError(RaycvError, ValueError):
    """A dataset that does not match its declared format (missing folders, no images, ...)."""


class StorageError(RaycvError, OSError):
    """A URI that cannot be reached or read: wraps the filesystem's own error with the URI."""


class TooManyErrorsError(RaycvError, RuntimeError):
    """An annotation run in which more images failed than ``max_error_fraction`` allows.

    Raised after the rows written so far are committed, so a re-run resumes where this one stopped.
    """


def error_fields(stage: str, exc: BaseException) -> tuple[str, str, str]:
    """(error_stage, error_type, error_message) of one image's failure, for its error row."""
    return stage, type(exc).__name__, str(exc)[:2000]


class LeaseLostError(RaycvError, RuntimeError):
    """A run whose lease on its output was taken over by another run: it stops before committing."""
