"""One error hierarchy. Every message says what is wrong and what to do next.

Classes also subclass the builtin they refine (as zarr-python does), so callers that
catch ``KeyError`` or ``ValueError`` keep working.
"""

from __future__ import annotations


class BackbenchError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 1

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class BackboneNotFound(BackbenchError, KeyError):
    """A backbone name or source that no registry knows."""


class WeightsError(BackbenchError, ValueError):
    """Weights that cannot be found, read or matched to the architecture."""


class DataSourceError(BackbenchError, ValueError):
    """A data source that is missing, empty or malformed."""


class SampleError(BackbenchError, ValueError):
    """One sample (an image file) that cannot be decoded."""


class CacheError(BackbenchError):
    """A feature cache that cannot be opened or written as asked."""


class GroupNotFound(CacheError, KeyError):
    """A (backbone, dataset, split) group that the cache does not hold."""


class CacheMismatch(CacheError, ValueError):
    """An existing group made with other weights, preprocessing or data."""


class IncompleteGroup(CacheError):
    """A group whose extraction has not finished."""


class DamagedGroup(CacheError, ValueError):
    """A group whose arrays, attributes or chunks disagree with each other or with their checksums."""


class ProbeInputError(BackbenchError, ValueError):
    """Inputs to a probe that cannot give a meaningful result."""


class NotApplicable(BackbenchError):
    """A task that does not apply to this backbone (zero-shot on a backbone without a text tower):
    the battle shows the cell as n/a, never as a failure."""


class MissingDependency(BackbenchError, ImportError):
    """An optional package that is not installed."""


class OptionError(BackbenchError, ValueError):
    """A command-line value the command does not accept: a usage error (exit code 2)."""

    exit_code = 2


class BackbenchWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints one note line)."""


class DamagedWarning(BackbenchWarning):
    """A group skipped by a listing because its metadata cannot be read (``backbench verify`` lists it)."""


def require(module: str, package: str | None = None, *, extra: str | None = None):
    """Import ``module`` or raise :class:`MissingDependency` saying what to install: backbench's
    optional ``extra`` (``pip install 'backbench[clip]'``), else the pip ``package``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = f"pip install 'backbench[{extra}]'" if extra else f"pip install {package or module}"
        raise MissingDependency(f"{module.split('.')[0]} is not installed: run `{how}`") from exc
