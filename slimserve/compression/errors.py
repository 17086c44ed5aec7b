"""Errors raised by the compression toolkit (the registry's own are in `slimserve.registry`).

CompressionError
├── ImportFailed         a source could not be imported
├── RecipeError          a recipe that is malformed or cannot run (before any work)
└── CheckpointError      a training checkpoint fails its checksum or does not match the run
"""

from __future__ import annotations


class CompressionError(Exception):
    """Base class of every error this package raises on purpose."""


class ImportFailed(CompressionError):
    """A model source could not be read or converted."""


class RecipeError(CompressionError, ValueError):
    """A recipe is malformed or names something unknown."""
