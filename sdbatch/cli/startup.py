"""Faster process start: import the heavy libraries (torch, diffusers, transformers) without the cyclic GC.

Importing them builds millions of long-lived objects (modules, classes, functions). With the collector on,
each few hundred thousand allocations trigger a full collection that walks all of them again: about a third
of a `python run.py` start-up on a small model. Nothing imported is garbage, so the collector is paused for
the imports and what they built is then frozen (gc.freeze: left out of every later collection, including the
one at interpreter exit). Cycles made by the run itself are collected as usual.

The freeze also takes the frames on the import's call stack (the imports' warnings and log calls make frame
objects of them, in reference cycles that are then never collected), and a frame keeps its locals once its
function returns. Imported deep inside a run, the first job of a multirun kept its engine, and through it its
text encodings and model, for good: past the engine cache's bound and the model cache's. So a multirun job
imports the engine from a shallow frame first (`sdbatch.cli.runner.import_engine`), above any frame that will
hold an engine.
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
