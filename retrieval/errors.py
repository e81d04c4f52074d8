"""Exceptions shared by every stage.  Messages say what was wrong and how to fix it."""


class ImgIndexError(Exception):
    """Base class for errors imgindex reports to users (CLI prints them without a traceback)."""


class ConfigError(ImgIndexError, ValueError):
    """Invalid configuration or arguments, detected before any work starts."""


class HandleError(ImgIndexError):
    """An embedder handle could not be resolved or loaded."""


class IndexFormatError(ImgIndexError):
    """An index directory is missing, incomplete, corrupted or of an unknown format."""


class QueryError(ConfigError):
    """A query the caller can fix (HTTP 400).  `code` is a stable machine-readable name."""

    code = "bad_query"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class DimensionMismatchError(QueryError):
    """A query vector of another dimension than the index takes."""

    code = "dimension_mismatch"

    def __init__(self, message: str, expected: int, got: object):
        super().__init__(message)
        self.expected, self.got = expected, got


class NonFiniteQueryError(QueryError):
    code = "non_finite"
