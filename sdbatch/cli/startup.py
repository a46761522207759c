"""Faster process start: import the heavy libraries (torch, diffusers, transformers) without the cyclic GC.

Importing them builds millions of long-lived objects (modules, classes, functions). With the collector on,
each few hundred thousand allocations trigger a full collection that walks all of them again: about a third
of a `python run.py` start-up on a small model. Nothing imported is garbage, so the collector is paused for
the imports and what they built is then frozen (gc.freeze: left out of every later collection, including the
one at interpreter exit). Cycles made by the run itself are collected as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_frozen = False  # once per process


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Run the block (the first import of the engine) with the cyclic GC paused, then freeze what is alive.

    Only the first use pauses and freezes: later jobs of a multirun find the modules imported, and freezing
    again would keep the garbage of the jobs before them (models included) alive for good.
    """
    global _frozen
    if _frozen:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        _frozen = True
        gc.freeze()
        if was_enabled:
            gc.enable()
