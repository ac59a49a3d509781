"""Stagecoach: pipeline-parallel inference for Qwen2-architecture models across GPU nodes."""

__version__ = "0.1.0"
