"""Errors the registry raises.

RegistryError
├── InvalidName          a model name, alias or ref that is not allowed
├── ModelNotFound        no such name, version or alias in the registry
└── IntegrityError       a file's checksum or size differs from the manifest
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class InvalidName(RegistryError, ValueError):
    """A name, alias or version reference that the registry does not accept."""


class ModelNotFound(RegistryError, LookupError):
    """The registry has no such name, version or alias."""


class IntegrityError(RegistryError):
    """An artifact's files do not match its manifest (tampered, truncated or extra)."""
