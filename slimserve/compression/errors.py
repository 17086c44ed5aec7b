"""Errors raised by the compression toolkit and the registry.

CompressionError
├── InvalidName          a model name, alias or ref that is not allowed
├── ModelNotFound        no such name, version or alias in the registry
├── IntegrityError       a file's checksum or size differs from the manifest
├── ImportFailed         a source could not be imported
└── RecipeError          a recipe that is malformed or cannot run (before any work)
"""

from __future__ import annotations


class CompressionError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidName(CompressionError, ValueError):
    """A name, alias or version reference that the registry does not accept."""


class ModelNotFound(CompressionError, LookupError):
    """The registry has no such name, version or alias."""


class IntegrityError(CompressionError):
    """An artifact's files do not match its manifest (tampered, truncated or extra)."""


class ImportFailed(CompressionError):
    """A model source could not be read or converted."""


class RecipeError(CompressionError, ValueError):
    """A recipe is malformed or names something unknown."""
