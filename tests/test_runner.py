"""Runner and engine options in-process: resume after an interruption, seeds, precision, attention, chunks."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from engine_helpers import max_diff, ours, pixels, spec

from sdbatch.cli.runner import run
from sdbatch.config.spec import ModelConfig, PerfConfig
from sdbatch.engine.core.engine import Engine, get_engine
from sdbatch.engine.models import loading
from sdbatch.errors import ConfigError

torch.set_num_threads(1)


def _files(run_dir) -> dict[str, np.ndarray]:
    return {p.name: pixels(p) for p in sorted(run_dir.glob("*.png"))}


def test_interrupted_run_resumes_without_loss_or_duplicates(sd1_single_file, tmp_path, monkeypatch) -> None:
    run_spec = spec(sd1_single_file, prompt=["a cat", "a dog"], images_per_prompt=3, batch_size=2, seed=40)
    clean = _files(run(run_spec, tmp_path / "clean").run_dir)
    real, calls = Engine.run_batch, []

    def dies_on_second_batch(self, batch, on_step=None):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch, on_step)

    monkeypatch.setattr(Engine, "run_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(run_spec, tmp_path / "resumed")
    assert len(_files(tmp_path / "resumed")) == 2
    monkeypatch.setattr(Engine, "run_batch", real)
    result = run(run_spec, tmp_path / "resumed")
    assert (len(result.written), result.skipped) == (4, 2)
    resumed = _files(tmp_path / "resumed")
    assert resumed.keys() == clean.keys() and max_diff(list(resumed.values()), list(clean.values())) == 0
    lines = (tmp_path / "resumed" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["file"] for line in lines) == sorted(clean)


def test_random_seed_is_recorded_and_reused_on_resume(sd1_single_file, tmp_path) -> None:
    run_spec = spec(sd1_single_file, images_per_prompt=2, seed=None)
    first = run(run_spec, tmp_path / "r")
    seeds = [json.loads(line)["seed"] for line in (tmp_path / "r" / "manifest.jsonl").read_text().splitlines()]
    assert seeds[1] == seeds[0] + 1 and f"seed: {seeds[0]}" in (tmp_path / "r" / "config.yaml").read_text()
    again = run(run_spec, tmp_path / "r")
    assert (len(first.written), len(again.written), again.skipped) == (2, 0, 2)


def test_batch_size_changes_no_file(sd1_single_file, tmp_path) -> None:
    base = spec(sd1_single_file, prompt=["a", "b", "c"], images_per_prompt=2, seed=9, sampler="euler_a")
    one = _files(run(dataclasses.replace(base, batch_size=1), tmp_path / "b1").run_dir)
    four = _files(run(dataclasses.replace(base, batch_size=4), tmp_path / "b4").run_dir)
    assert one.keys() == four.keys()
    assert max_diff(list(one.values()), list(four.values())) <= 1


def test_models_load_once_per_process(sd1_single_file, tmp_path) -> None:
    run(spec(sd1_single_file, seed=1), tmp_path / "a")
    loads = loading.load_count()
    run(spec(sd1_single_file, seed=2, sampler="euler"), tmp_path / "b")
    assert loading.load_count() == loads


def test_clip_skip_takes_an_earlier_layer(sd1_single_file, sd1_components) -> None:
    run_spec = spec(sd1_single_file)
    engine = get_engine(dataclasses.replace(run_spec.model, clip_skip=2), run_spec.perf)
    text_encoder = sd1_components[2]
    ids, _ = engine.bundle.tokenizer.encode_padded("a cat")
    with torch.no_grad():
        out = text_encoder(torch.tensor([ids]), output_hidden_states=True)
        expected = text_encoder.final_layer_norm(out.hidden_states[-2])
    got = engine.text.encode(["a cat"], clip_skip=2)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, engine.text.encode(["a cat"], clip_skip=1), atol=1e-3)
    with pytest.raises(ConfigError, match="clip_skip=9"):
        engine.text.encode(["a cat"], clip_skip=9)


def test_text_encodings_are_cached(sd1_single_file) -> None:
    engine = get_engine(spec(sd1_single_file).model, PerfConfig())
    engine.text.encode(["cache me", "cache me"], clip_skip=1)
    before = engine.text.encoded
    engine.text.encode(["cache me"], clip_skip=1)
    assert engine.text.encoded == before


def test_long_prompt_is_truncated_with_a_warning(sd1_single_file, caplog) -> None:
    run_spec = spec(sd1_single_file)
    with caplog.at_level(logging.WARNING):
        images = ours(run_spec, [" ".join(["word"] * 100)], [1])
    assert images[0].shape == (64, 64, 3)
    assert "truncated" in caplog.text


def test_fp16_on_cpu_falls_back_to_fp32(sd1_single_file, caplog) -> None:
    model = dataclasses.replace(spec(sd1_single_file).model, precision="fp16")
    with caplog.at_level(logging.WARNING):
        engine = get_engine(model, PerfConfig(device="cpu"))
    assert engine.info.precision == "fp32" and "fp16 is not supported on the CPU" in caplog.text


def test_bf16_runs_on_cpu(sd1_single_file) -> None:
    run_spec = spec(sd1_single_file)
    bf16 = dataclasses.replace(run_spec, model=dataclasses.replace(run_spec.model, precision="bf16"))
    image = ours(bf16, ["a cat"], [3])[0]
    assert image.shape == (64, 64, 3) and max_diff([image], ours(run_spec, ["a cat"], [3])) < 64


@pytest.mark.parametrize("attention", ["eager", "xformers"])
def test_attention_modes_agree(attention, sd1_single_file, caplog) -> None:
    base = spec(sd1_single_file)
    other = dataclasses.replace(base, perf=PerfConfig(attention=attention))
    with caplog.at_level(logging.WARNING):
        got = ours(other, ["a cat"], [4])
    assert max_diff(got, ours(base, ["a cat"], [4])) <= 1
    if attention == "xformers" and not loading._xformers_available():
        assert "xformers is not installed; using SDPA" in caplog.text


@pytest.mark.parametrize("perf", [PerfConfig(vae_batch_size=1), PerfConfig(vae_slices=3),
                                  PerfConfig(vae_batch_size=2, vae_slices=16)])
def test_vae_batch_size_and_slices_change_no_pixel(perf, sd1_single_file, caplog) -> None:
    base = spec(sd1_single_file)
    chunked = dataclasses.replace(base, perf=perf)
    assert max_diff(ours(chunked, ["a", "b", "c"], [1, 2, 3]), ours(base, ["a", "b", "c"], [1, 2, 3])) <= 1
    assert "not in slices" not in caplog.text, "the sliced decode ran, not its whole-image fallback"


def test_cuda_device_without_cuda_is_a_config_error(sd1_single_file) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        get_engine(ModelConfig(checkpoint=str(sd1_single_file)), PerfConfig(device="cuda"))


def test_grid_holds_every_image_of_the_run(sd1_single_file, tmp_path) -> None:
    run_spec = spec(sd1_single_file, prompt=["a", "b"], images_per_prompt=3, seed=1,
                    output=dataclasses.replace(spec(sd1_single_file).output, grid=True))
    run(run_spec, tmp_path)
    grid = pixels(tmp_path / "grid.png")
    assert grid.shape == (2 * 64, 3 * 64, 3)
    first_of_second_row = pixels(tmp_path / "00003-4.png")
    assert np.array_equal(grid[64:, :64], first_of_second_row)


def test_model_cache_keeps_the_most_recent_models(sd1_single_file, sd1_ckpt, sd1_diffusers_dir) -> None:
    engines = [get_engine(spec(src).model, PerfConfig()) for src in (sd1_single_file, sd1_ckpt, sd1_diffusers_dir)]
    assert [loading.is_cached(e.bundle) for e in engines] == [False, True, True]
    assert get_engine(spec(sd1_diffusers_dir).model, PerfConfig()) is engines[2]
