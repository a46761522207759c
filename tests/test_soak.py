"""A long multirun in one process holds its memory: per-job Hydra and sdbatch state does not pile up.

What grew (found with bench/soak.py --diagnose and live-object counts):
- Hydra's launcher keeps every job's JobReturn to the end of the sweep, each with two deep copies of the job's
  config: ~180 KiB and ~1,100 live objects per job, 0.19 MB of RSS per job. The SweepIndex callback now drops
  the copies when the job ends.
- sdbatch made one Engine, with its own text-encoding cache, per value of a swept engine key (perf.vae_*,
  model.clip_skip, ...): one per job in such a sweep. Now at most MAX_ENGINES.
- The engine's first import froze (gc.freeze, sdbatch.cli.startup) the frames of the job importing it, and
  those kept that job's engine, and through it its model, for good. A multirun job now imports the engine
  from a shallow frame before its run (runner.import_engine).
These tests count live objects, not RSS: `python bench/soak.py --jobs 1000` measures that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from sdbatch.engine.core import engine as engine_module
from sdbatch.outputs.sweep_index import SweepIndex

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
JOBS, FIRST = 16, 4  # live objects are compared between job FIRST's start and the last job's


def test_job_end_drops_the_config_copies_the_launcher_would_keep() -> None:
    ret = JobReturn(overrides=["seed=1"], cfg=OmegaConf.create({"seed": 1}),
                    hydra_cfg=OmegaConf.create({"hydra": {"job": {"num": 0}}}), working_dir="/tmp",
                    status=JobStatus.COMPLETED)
    ret.return_value = None
    SweepIndex().on_job_end(OmegaConf.create({}), job_return=ret)
    assert ret.cfg is None and ret.hydra_cfg is None
    assert ret.overrides == ["seed=1"] and ret.return_value is None  # what the sweeper still reads


def test_engines_are_bounded_and_reused(sd1_single_file) -> None:
    """One engine per engine key (here perf.vae_batch_size), at most MAX_ENGINES of them, all on one loaded model."""
    from engine_helpers import spec

    base = spec(sd1_single_file)
    perfs = [dataclasses.replace(base.perf, vae_batch_size=n) for n in range(1, engine_module.MAX_ENGINES + 4)]
    engines = [engine_module.get_engine(base.model, perf) for perf in perfs]
    assert len(engine_module._ENGINES) <= engine_module.MAX_ENGINES
    assert len({id(e.bundle) for e in engines}) == 1  # the model loads once
    assert engine_module.get_engine(base.model, perfs[-1]) is engines[-1]  # the recent ones are reused
    assert engine_module.get_engine(base.model, perfs[-2]) is engines[-2]


@pytest.mark.slow  # end-to-end in subprocesses: the slow stage of .ci/run
def test_a_multirun_keeps_no_per_job_objects(cache_dir, tmp_path) -> None:
    """16 jobs in one process, each with its own perf.vae_batch_size (a new engine key): from job 4 on, the live
    objects grow by Hydra's small JobReturn (with its overrides list) per job, nothing more.

    Before the fixes: about 1,100 objects per job (omegaconf nodes and dicts of the kept config copies) and one
    Engine and TextEncoder (with its encodings) per job. Now: 2 per job, plus ~90 made once (weakrefs).
    """
    out = tmp_path / "counts.json"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "model=tiny", "prompt=a cat", "seed=1",
           f"perf.vae_batch_size=range(1,{JOBS + 1})", "width=32", "height=32", "sampler.steps=1",
           "perf.progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "hydra.callbacks.sweep_index.contact_sheet=false",
           "+hydra.callbacks.soak_probe._target_=soak_probe.LiveObjects", f"+hydra.callbacks.soak_probe.out={out}",
           f"+hydra.callbacks.soak_probe.marks=[{FIRST},{JOBS - 1}]"]
    env = {**os.environ, "SDBATCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {int(k): v for k, v in json.loads(out.read_text()).items()}
    first, last = counts[FIRST], counts[JOBS - 1]
    # every engine that left the cache is gone, the first job's too (frozen with the engine's import, it was not)
    alive = last.pop("engines alive")
    assert alive <= engine_module.MAX_ENGINES, f"{alive} engines alive, the cache holds {engine_module.MAX_ENGINES}"
    first.pop("engines alive")
    grown = {k: n - first.get(k, 0) for k, n in last.items() if n > first.get(k, 0)}
    jobs = JOBS - 1 - FIRST
    for kind in ("omegaconf.dictconfig.DictConfig", "omegaconf.base.Metadata", "sdbatch.engine.core.engine.Engine",
                 "sdbatch.engine.text.encoder.TextEncoder", "torch.Tensor"):
        assert grown.get(kind, 0) == 0, f"{kind}: {grown.get(kind)} more over {jobs} jobs; grown: {grown}"
    assert last.get("sdbatch.engine.core.engine.Engine", 0) <= engine_module.MAX_ENGINES
    assert sum(grown.values()) <= 200 + 5 * jobs, f"{sum(grown.values())} more objects over {jobs} jobs: {grown}"
