"""User-facing errors: one line naming the key, file or prompt line and what would fix it."""

from __future__ import annotations


class SdbatchError(Exception):
    """A user mistake or an unusable input; run.py prints it as one line and exits with status 2."""


class ConfigError(SdbatchError):
    """A config key has a bad value, a wrong type or an unknown name."""


class ModelError(SdbatchError):
    """A model file is missing, unreadable, unsafe or not a Stable Diffusion model."""


class PromptError(SdbatchError):
    """A prompt line cannot be parsed."""


class OutputError(SdbatchError):
    """The run directory or an output file cannot be written."""
