"""Typed errors raised at Stagecoach's boundaries; the CLI, HTTP and gRPC layers map them to statuses."""

from __future__ import annotations


class StagecoachError(Exception):
    """Base of every error a user can cause and fix; its message says what to change."""


class ConfigError(StagecoachError):
    """A configuration, config.json or command-line value is invalid."""


class CheckpointError(StagecoachError):
    """A checkpoint folder is missing files or tensors, or a tensor has the wrong shape."""


class PartitionError(StagecoachError):
    """A layer split cannot be built (wrong sum, more stages than layers, …)."""


class RequestError(StagecoachError):
    """A request is invalid: prompt too long, bad sampling parameter, unknown token id."""
