"""perf.compile: what the compiled UNet traces (dynamo with its eager backend: no code generation, so this runs in
seconds), that LoRA hooks add no graph break unless the batch needs per-image rows, and that a later run without
perf.compile runs the UNet eager again."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from sdbatch.config.spec import LoraConfig, NetworkConfig, PerfConfig
from sdbatch.engine.core.engine import get_engine
from tests.engine_helpers import max_diff, run_images, spec


@pytest.fixture
def traced(monkeypatch):
    """torch.compile with dynamo's eager backend, its counters and compiled code reset before and after."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _lora_spec(checkpoint, compile_on: bool, muls: list[float] | None = None):
    network = NetworkConfig(name="lora", loras=[LoraConfig(path="builtin:tiny-lora", mul=0.8)])
    prompts = [f"a castle --am {m}" for m in muls] if muls else ["a castle", "a tower"]
    return spec(checkpoint, steps=3, network=network, prompt=prompts, seed=5, batch_size=2,
                perf=PerfConfig(compile=compile_on, progress=False))


def test_lora_hooks_compile_without_graph_breaks(traced, sd1_single_file, tmp_path):
    eager, _ = run_images(_lora_spec(sd1_single_file, False), tmp_path / "eager")
    compiled, _ = run_images(_lora_spec(sd1_single_file, True), tmp_path / "compiled")
    assert sum(traced["graph_break"].values()) == 0, dict(traced["graph_break"])
    assert traced["stats"]["unique_graphs"] == 1  # one shape bucket: one graph, every step reuses it
    assert max_diff(eager, compiled) <= 1


def test_per_image_multipliers_still_apply_when_compiled(traced, sd1_single_file, tmp_path):
    eager, _ = run_images(_lora_spec(sd1_single_file, False, [0.2, 1.0]), tmp_path / "eager")
    compiled, _ = run_images(_lora_spec(sd1_single_file, True, [0.2, 1.0]), tmp_path / "compiled")
    assert max_diff(eager, compiled) <= 1
    assert sum(traced["graph_break"].values()) > 0  # the rows are read eagerly: documented in the README


def test_a_run_without_compile_runs_eager_again(traced, sd1_single_file):
    on = _lora_spec(sd1_single_file, True)
    unet = get_engine(on.model, on.perf).bundle.unet
    assert "forward" in unet.__dict__
    get_engine(on.model, PerfConfig(compile=False))
    assert "forward" not in unet.__dict__
