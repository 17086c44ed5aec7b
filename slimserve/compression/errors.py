"""Errors raised by the compression toolkit (the registry's own are in `slimserve.registry`).

CompressionError
├── ImportFailed              a source could not be imported
├── RecipeError               a recipe that is malformed or cannot run (before any work)
└── CheckpointMismatchError   a training checkpoint that does not match the run

A checkpoint file that fails its checksum raises the registry's ``IntegrityError``.
"""

from __future__ import annotations


class CompressionError(Exception):
    """Base class of every error this package raises on purpose."""


class ImportFailed(CompressionError):
    """A model source could not be read or converted."""


class RecipeError(CompressionError, ValueError):
    """A recipe is malformed or names something unknown."""


class CheckpointMismatchError(CompressionError, ValueError):
    """A checkpoint directory holds a run made with another config or other data."""
