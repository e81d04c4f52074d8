"""Exceptions shared by every stage.  Messages say what was wrong and how to fix it."""


class ImgIndexError(Exception):
    """Base class for errors imgindex reports to users (CLI prints them without a traceback)."""


class ConfigError(ImgIndexError, ValueError):
    """Invalid configuration or arguments, detected before any work starts."""


class HandleError(ImgIndexError):
    """An embedder handle could not be resolved or loaded."""


class IndexFormatError(ImgIndexError):
    """An index directory is missing, incomplete, corrupted or of an unknown format."""
