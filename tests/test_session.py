"""The patch session: a run that dies mid-batch leaves the cached model exactly as a fresh load of its file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import max_diff, run_images, spec
from lora_files import make_lora
from test_xti import all_layers, sd16_components, sd16_file, word_row, xti_file  # noqa: F401 (fixtures)

from sdbatch.cli.runner import run
from sdbatch.config.spec import LoraConfig, NetworkConfig
from sdbatch.engine.core.device import pick_placement
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.models.loading import clear_model_cache, load_models

torch.set_num_threads(1)


class Killed(Exception):
    """What the test raises inside the UNet."""


def _fresh(run_spec):
    """The run's model files loaded again from disk, bypassing the cache."""
    clear_model_cache()
    placement = pick_placement(run_spec.perf.device, run_spec.model.precision, run_spec.model.no_half_vae)
    return load_models(run_spec.model.checkpoint, vae=run_spec.model.vae, v2=run_spec.model.v2,
                       device=placement.device, dtype=placement.dtype, vae_dtype=placement.vae_dtype)


def _hooks(module: torch.nn.Module) -> list[str]:
    """Every hook and instance-level forward left on the module or any submodule."""
    left = []
    for name, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks or "forward" in vars(sub):
            left.append(name or "(root)")
    return left


def _assert_same_weights(bundle, fresh, vocabulary: int) -> None:
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(bundle, part).state_dict(), getattr(fresh, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for key, value in theirs.items():
            got = ours[key]
            if got.shape != value.shape:  # Textual Inversion adds vocabulary rows after the model's own
                got = got[: value.shape[0]]
                assert value.shape[0] == vocabulary, key
            assert torch.equal(got, value), f"{part}.{key} differs from a fresh load"


@pytest.mark.parametrize("mode", ["hooked", "merge", "precalc"])
def test_an_exception_mid_batch_leaves_the_cached_model_as_loaded(sd16_file, sd16_components, mode,  # noqa: F811
                                                                  tmp_path) -> None:
    unet, _, text_encoder = sd16_components
    lora = make_lora(tmp_path / "style.safetensors", unet, text_encoder)
    xti = xti_file(tmp_path / "myxti.pt", all_layers(word_row(text_encoder, "cat"), MID=word_row(text_encoder, "dog")))
    network = NetworkConfig(name="lora", loras=[LoraConfig(path=str(lora), mul=0.8)], mode=mode)
    base = spec(sd16_file, prompt=["a myxti house --am 0.5 --dsd1 1 --dst1 500", "a red cube --am 1"],
                seed=5, steps=4, batch_size=2)
    run_spec = dataclasses.replace(base, network=network,
                                   model=dataclasses.replace(base.model, xti_embeddings=[str(xti)]))
    engine = get_engine(run_spec.model, run_spec.perf)
    bundle, vocabulary = engine.bundle, text_encoder.get_input_embeddings().weight.shape[0]
    calls = []

    def dies_in_the_third_unet_call(module, args):
        calls.append(_hooks(bundle.unet))
        if len(calls) == 3:
            raise Killed

    handle = bundle.unet.mid_block.register_forward_pre_hook(dies_in_the_third_unet_call)
    try:
        with pytest.raises(Killed):
            run(run_spec, tmp_path / "killed")
    finally:
        handle.remove()
    assert len(calls[-1]) > 1, "the patches were on the UNet when the exception came"
    assert _hooks(bundle.unet) == [] and _hooks(bundle.text_encoder) == [], "every hook is gone"
    assert engine.networks is None
    _assert_same_weights(bundle, _fresh(run_spec), vocabulary)


def test_a_run_after_a_killed_one_is_the_plain_model(sd1_single_file, tmp_path, sd1_components) -> None:
    unet, _, text_encoder = sd1_components
    lora = make_lora(tmp_path / "style.safetensors", unet, text_encoder)
    base = spec(sd1_single_file, prompt=["a red cube"], seed=5, steps=4)
    plain, _ = run_images(base, tmp_path / "plain")
    merged = dataclasses.replace(base, network=NetworkConfig(name="lora", loras=[LoraConfig(path=str(lora))],
                                                             mode="merge"))
    engine = get_engine(base.model, base.perf)
    handle = engine.bundle.unet.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(Killed()))
    try:
        with pytest.raises(Killed):
            run(merged, tmp_path / "killed")
    finally:
        handle.remove()
    again, _ = run_images(base, tmp_path / "again")
    assert max_diff(again, plain) == 0
