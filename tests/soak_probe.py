"""Test helper for tests/test_soak.py: a Hydra callback that counts live objects by type at some jobs' start.

Added on the command line (tests only; the product has no probe), with this folder on PYTHONPATH:
`+hydra.callbacks.soak_probe._target_=soak_probe.LiveObjects +hydra.callbacks.soak_probe.out=FILE
'+hydra.callbacks.soak_probe.marks=[5,29]'`. At the start of each job in `marks` it runs gc.collect() and
counts gc.get_objects() by type, and under "engines alive" how many of the engines that were ever in sdbatch's
engine cache are still alive, frozen or not; at the last mark it writes {job: {type: count}} to `out` as JSON.
"""

from __future__ import annotations

import collections
import gc
import json
import sys
import weakref
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def live_objects() -> dict[str, int]:
    """Live objects by type after a collection (gc.get_objects leaves out frozen ones)."""
    gc.collect()
    return dict(collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()))


class LiveObjects(Callback):
    def __init__(self, out: str, marks: list[int]) -> None:
        self.out = Path(out)
        self.marks = sorted(int(m) for m in marks)
        self.counts: dict[int, dict[str, int]] = {}
        self.engines: weakref.WeakSet = weakref.WeakSet()  # every engine seen in the cache at a job's start

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        num = int(config.hydra.job.num)
        engine = sys.modules.get("sdbatch.engine.core.engine")
        if engine is not None:
            self.engines.update(engine._ENGINES.values())
        if num in self.marks:
            self.counts[num] = {**live_objects(), "engines alive": len(self.engines)}
        if num == self.marks[-1]:
            self.out.write_text(json.dumps(self.counts), encoding="utf-8")
