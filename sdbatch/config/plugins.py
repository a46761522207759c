"""User plug-ins named as `module:function` (highres.upscaler, guidance.preprocess): loaded and checked here."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from sdbatch.errors import ConfigError


def load_callable(path: str, key: str, example: str = "my_pkg.module:run") -> Callable:
    """The `module:function` callable named by config key `key`; ConfigError naming the key otherwise."""
    module_name, colon, attr = path.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"{key}={path!r} must be 'module:function', e.g. '{example}'")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as ex:
        raise ConfigError(f"{key}={path!r} cannot be loaded: {ex}") from None
    if not callable(function):
        raise ConfigError(f"{key}={path!r} is not callable")
    return function
