"""LoRA networks in runs: config keys, modes, --am and grid multipliers, metadata, cache keys, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from engine_helpers import max_diff, run_images, spec
from lora_files import make_lora
from test_run import SMALL, manifest, run_cli

from sdbatch.cli.runner import run
from sdbatch.config.spec import GridConfig, LoraConfig, NetworkConfig
from sdbatch.engine.core.engine import Engine, get_engine
from sdbatch.errors import ConfigError, ModelError
from sdbatch.prompts.png_info import read_png_params

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def lora(tmp_path_factory, sd1_components):
    unet, _, text_encoder = sd1_components
    return make_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", unet, text_encoder)


def _with_lora(run_spec, path, mul: float = 1.0, mode: str = "hooked", **network):
    net = NetworkConfig(name="lora", loras=[LoraConfig(path=str(path), mul=mul)], mode=mode, **network)
    return dataclasses.replace(run_spec, network=net)


def _run(run_spec, run_dir):
    return run_images(run_spec, run_dir)[0]


def test_modes_agree_and_zero_multiplier_is_the_plain_model(sd1_single_file, lora, tmp_path) -> None:
    base = spec(sd1_single_file, prompt=["a red cube", "a lighthouse"], seed=5, batch_size=2)
    plain = _run(base, tmp_path / "plain")
    hooked = _run(_with_lora(base, lora, 0.8), tmp_path / "hooked")
    assert max_diff(hooked, plain) > 8, "the LoRA changes the images"
    for mode in ("merge", "precalc"):
        assert max_diff(_run(_with_lora(base, lora, 0.8, mode), tmp_path / mode), hooked) <= 1
    assert max_diff(_run(_with_lora(base, lora, 0.0), tmp_path / "zero"), plain) == 0
    assert get_engine(base.model, base.perf).networks is None, "a run takes its networks off the cached model"
    assert max_diff(_run(base, tmp_path / "after"), plain) == 0, "the cached model is clean after LoRA runs"


def test_prompt_multipliers_and_network_muls(sd1_single_file, lora, tmp_path, monkeypatch) -> None:
    base = spec(sd1_single_file, prompt=["a red cube --am 0", "a red cube --am 0.8"], seed=5, batch_size=4)
    batches = []
    real = Engine.run_batch
    monkeypatch.setattr(Engine, "run_batch", lambda self, batch, on_step=None: batches.append(len(batch.jobs))
                        or real(self, batch, on_step))
    per_line = _run(_with_lora(base, lora, 0.3), tmp_path / "am")
    assert batches == [2], "hooked: images with other multipliers share one batch"
    precalc = _run(_with_lora(base, lora, 0.3, "precalc"), tmp_path / "precalc")
    assert batches == [2, 1, 1], "precalc merges per batch: one batch per multiplier set"
    plain = _run(spec(sd1_single_file, prompt=["a red cube"] * 2, seed=5), tmp_path / "plain")
    full = _run(_with_lora(spec(sd1_single_file, prompt=["a red cube"] * 2, seed=5), lora, 0.8), tmp_path / "full")
    assert max_diff(per_line[:1], plain[:1]) <= 1 and max_diff(per_line[1:], full[1:]) <= 1
    assert max_diff(precalc, per_line) <= 1
    lines = sorted(manifest(tmp_path / "am"), key=lambda x: x["index"])
    assert [line["networks"][0]["mul"] for line in lines] == [0.0, 0.8]
    run_muls = _with_lora(spec(sd1_single_file, prompt=["a red cube"] * 2, seed=5), lora, 0.1, muls=[0.8])
    assert max_diff(_run(run_muls, tmp_path / "muls"), full) <= 1, "network.muls replaces loras[].mul"


def test_text_encodings_are_cached_per_multiplier(sd1_single_file, lora, tmp_path) -> None:
    run_spec = _with_lora(spec(sd1_single_file, prompt=["a cube --am 0.5", "a cube --am 1"], seed=1), lora)
    engine = get_engine(run_spec.model, run_spec.perf)
    before = engine.text.encoded
    run(run_spec, tmp_path / "a")
    assert engine.text.encoded - before == 4, "prompt and negative, once per multiplier (text-encoder LoRA)"
    run(run_spec, tmp_path / "b")
    assert engine.text.encoded - before == 4, "a second run reuses them"


def test_grid_axis_of_multipliers_shares_batches(sd1_single_file, lora, tmp_path) -> None:
    run_spec = _with_lora(spec(sd1_single_file, prompt="a red cube", seed=3, batch_size=4,
                               grid=GridConfig(x="network_muls:0,0.8")), lora, 0.5)
    images = _run(run_spec, tmp_path / "grid")
    plain = _run(spec(sd1_single_file, prompt="a red cube", seed=3), tmp_path / "plain")
    assert max_diff(images[:1], plain) <= 1 and max_diff(images[1:], plain) > 8
    alone = _run(_with_lora(spec(sd1_single_file, prompt="a red cube", seed=3), lora, 0.8), tmp_path / "alone")
    assert max_diff(images[1:], alone) <= 1, "the 0.8 cell, computed in a shared batch, is the 0.8 image"
    assert (tmp_path / "grid" / "grid.png").exists()
    with pytest.raises(ConfigError, match="grid.x=network_muls needs network=lora"):
        from sdbatch.config.resolve import _check_networks

        _check_networks(_with_lora(run_spec, lora, mode="merge"))


def test_metadata_records_networks(sd1_single_file, lora, tmp_path) -> None:
    _run(_with_lora(spec(sd1_single_file, prompt="a red cube", seed=3), lora, 0.7), tmp_path / "run")
    [line] = manifest(tmp_path / "run")
    [net] = line["networks"]
    assert (net["name"], net["mul"], net["merged"], len(net["hash"])) == ("style", 0.7, False, 12)
    params = read_png_params(tmp_path / "run" / line["file"])
    assert params["sdbatch"]["networks"][0]["hash"] == net["hash"]
    assert f"Lora hashes: \"style: {net['hash']}\"" in params["parameters"]


def test_a_lora_for_another_model_is_one_clear_error(sd1_single_file, sd2_components, tmp_path) -> None:
    other = make_lora(tmp_path / "sd2-style.safetensors", sd2_components[0], sd2_components[2])
    with pytest.raises(ModelError, match="sd2-style.safetensors"):
        run(_with_lora(spec(sd1_single_file, prompt="x"), other), tmp_path / "run")


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_cli_lora_run_sweep_preset_and_errors(cache_dir, tmp_path) -> None:
    """The preset's header command: the built-in demo LoRA on the built-in tiny model."""
    net = ["network=lora", "network.loras=[{path: builtin:tiny-lora}]"]
    sweep = tmp_path / "sweep"
    proc = run_cli(["+sweeps=lora_weights", "model=tiny", "prompt=a red cube", *net, *SMALL,
                    f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = [json.loads(line) for line in (sweep / "sweep.jsonl").read_text().splitlines()]
    assert [j["status"] for j in jobs] == ["completed"] * 5
    muls = [manifest(sweep / j["run_dir"])[0]["networks"][0]["mul"] for j in jobs]
    assert muls == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (sweep / "contact_sheet.png").exists()
    missing = run_cli(["model=tiny", "prompt=x", "network=lora", "network.loras=[{path: nope.safetensors}]", *SMALL,
                       f"hydra.run.dir={tmp_path / 'bad'}"], cache_dir, tmp_path)
    assert (cache_dir / "tiny-lora-sd1.safetensors").is_file(), "built once into the cache"
    assert manifest(sweep / jobs[0]["run_dir"])[0]["networks"][0]["name"] == "tiny-lora-sd1"
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        "sdbatch: error: network.loras[0].path: LoRA file nope.safetensors not found"], "before any load"


def test_sd2_lora_applies_in_every_mode(sd2_single_file, sd2_components, tmp_path) -> None:
    """SD2: linear proj_in/out in the UNet and the OpenCLIP text encoder (converted to CLIP's layout) match too."""
    unet, _, text_encoder = sd2_components
    lora = make_lora(tmp_path / "sd2-style.safetensors", unet, text_encoder)
    base = spec(sd2_single_file, prompt="a red cube", seed=5, family="sd2", v_pred=True)
    plain = _run(base, tmp_path / "plain")
    hooked = _run(_with_lora(base, lora, 0.8, strict=True), tmp_path / "hooked")
    assert max_diff(hooked, plain) > 8
    assert max_diff(_run(_with_lora(base, lora, 0.8, "merge", strict=True), tmp_path / "merge"), hooked) <= 1


def test_per_image_multipliers_in_one_unet_call(sd1_components, lora) -> None:
    """Rows [0, 1] over the CFG halves: image 0 gets the plain UNet, image 1 the full LoRA."""
    from sdbatch.engine.core.rows import NEGATIVE, PROMPT, Rows, calling
    from sdbatch.engine.features.lora_network import ROW_MULTIPLIERS, NetworkPatch, load_lora

    unet, _, text_encoder = sd1_components
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)  # 2 images × 2 halves
    context = torch.randn(4, 77, text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def call():
        with torch.no_grad():
            return unet(x, torch.tensor(500), encoder_hidden_states=context).sample

    plain = call()
    patch = NetworkPatch(unet, text_encoder, [load_lora(lora)])
    try:
        patch.hook()
        patch.set_multipliers([1.0])
        full = call()
        rows = Rows.of_images(2).stacked([NEGATIVE, PROMPT])  # the call's row contract: 2 images × 2 CFG parts
        with calling(rows.with_image_data(**{ROW_MULTIPLIERS: torch.tensor([[0.0], [1.0]])})):
            mixed = call()
    finally:
        patch.remove()
    rows_plain, rows_full = [0, 2], [1, 3]  # image 0 and image 1 in each CFG half
    assert torch.equal(mixed[rows_plain], plain[rows_plain])
    assert torch.allclose(mixed[rows_full], full[rows_full], atol=1e-5)
    assert not torch.allclose(full[rows_plain], plain[rows_plain], atol=1e-3)
