"""SDXL networks end to end on the tiny SDXL twin (model=tiny_xl): a kohya SDXL LoRA against diffusers'
StableDiffusionXLPipeline with the same file merged as diffusers converts it, per image by `<lora:>` tag, in hooked
and merge modes; ControlNet-LLLite runs with weight 0 (no LLLite at all), per-image guide images and its record.

Skipped where the SDXL loading (build_tiny_components("sdxl")) is not in this tree yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_helpers import SIZE, max_diff, run_images, spec
from PIL import Image
from safetensors.torch import save_file
from sdxl_net_files import diffusers_merged, kohya_sdxl_lora, lllite_state

from sdbatch.config.spec import GuidanceConfig, LoraConfig, NetworkConfig
from sdbatch.engine.features.lora_network import module_map
from sdbatch.engine.models.export import save_single_file
from sdbatch.engine.models.tiny import build_tiny_components

torch.set_num_threads(1)
RANK, ALPHA = 4, 2.0
SEEDS = [5, 6]
PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def xl() -> tuple:
    try:
        return build_tiny_components("sdxl", 0)
    except ValueError:
        pytest.skip("no SDXL loading in this tree (build_tiny_components has no 'sdxl')")


@pytest.fixture(scope="module")
def files(xl, tmp_path_factory) -> SimpleNamespace:
    unet, vae, text, text_2 = xl
    tmp = tmp_path_factory.mktemp("xlnet")
    names = module_map(unet, text, text_2)
    picked = {n: m for n, m in names.items()
              if n.endswith(("attn1_to_q", "attn2_to_v", "ff_net_2", "proj_in", "in_layers_2", "q_proj", "fc1"))}
    (tmp / "loras").mkdir()
    guides = tmp / "guides"
    guides.mkdir()
    for i, color in enumerate(((200, 30, 90), (20, 180, 240))):
        image = Image.new("RGB", (SIZE, SIZE), color)
        image.paste((255, 255, 255), (8 * i, 8, 40, 40))
        image.save(guides / f"{i}.png")
    save_file(lllite_state(unet), str(tmp / "lllite.safetensors"))
    return SimpleNamespace(checkpoint=save_single_file(tmp / "tiny-xl.safetensors", unet, vae, text, "sdxl",
                                                       text_encoder_2=text_2),
                           lora=kohya_sdxl_lora(tmp / "loras" / "xlstyle.safetensors", picked, RANK, ALPHA),
                           lllite=tmp / "lllite.safetensors", guides=guides, tmp=tmp)


def test_sdxl_lora_run_equals_diffusers_pipeline(xl, files, tmp_path):
    from test_sdxl import _pipeline  # the SDXL helper's reference pipeline (tokenizers, scheduler)

    unet, vae, text, text_2 = xl
    merged, _count = diffusers_merged(SimpleNamespace(unet=unet, text_encoder=text, text_encoder_2=text_2),
                                      files.lora, ALPHA / RANK)
    pipe = _pipeline((merged.unet, vae, merged.text_encoder, merged.text_encoder_2), tmp_path, "ddim")
    out = pipe([PROMPT] * 2, negative_prompt=[""] * 2, num_inference_steps=4, guidance_scale=7.5, height=SIZE,
               width=SIZE, generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS], output_type="pil")
    want = [np.asarray(im) for im in out.images]
    base = spec(files.checkpoint, steps=4, seed=SEEDS[0], images_per_prompt=2, prompt=PROMPT)
    # by tag, with an untagged image in the same batch (hooked: per-image multipliers)
    tagged = dataclasses.replace(base, prompt=[f"{PROMPT} <lora:xlstyle:1>", PROMPT], images_per_prompt=1,
                                 network=NetworkConfig(lora_dir=str(files.lora.parent)))
    by_tag, lines = run_images(dataclasses.replace(tagged, seed=SEEDS[0]), tmp_path / "tag")
    loras = NetworkConfig(name="lora", loras=[LoraConfig(path=str(files.lora))], mode="merge")
    merged_run, _ = run_images(dataclasses.replace(base, network=loras), tmp_path / "merge")
    plain, _ = run_images(base, tmp_path / "plain")
    assert max_diff(merged_run, want) <= 1 and max_diff(by_tag[:1], want[:1]) <= 1
    assert max_diff(by_tag[1:], plain[1:]) <= 1
    assert lines[0]["networks"][0]["name"] == "xlstyle" and max_diff(plain, want) > 8


def test_lllite_runs(files, tmp_path):
    guidance = GuidanceConfig(name="lllite", models=[str(files.lllite)], guide_image=str(files.guides))
    base = spec(files.checkpoint, steps=4, seed=SEEDS[0], images_per_prompt=2, prompt=PROMPT)
    plain, _ = run_images(base, tmp_path / "plain")
    off, _ = run_images(dataclasses.replace(base, guidance=dataclasses.replace(guidance, weights=[0.0])),
                        tmp_path / "off")
    on, lines = run_images(dataclasses.replace(base, guidance=guidance, batch_size=2), tmp_path / "on")
    alone, _ = run_images(dataclasses.replace(base, guidance=guidance, batch_size=1), tmp_path / "alone")
    early, _ = run_images(dataclasses.replace(base, guidance=dataclasses.replace(guidance, ratios=[0.25])),
                          tmp_path / "early")
    assert all(np.array_equal(a, b) for a, b in zip(off, plain, strict=True))  # weight 0 is no LLLite, exactly
    assert max_diff(on, alone) <= 1  # each image its own guide image, batched or not
    assert min(max_diff([a], [b]) for a, b in zip(on, plain, strict=True)) > 2
    assert max_diff(early, on) > 0 and max_diff(early, plain) > 0  # on for the first steps only
    assert lines[1]["guidance"]["units"][0]["guide_image"] == str(files.guides / "1.png")
    assert lines[0]["guidance"]["units"][0]["name"] == "lllite" and lines[0]["guidance"]["name"] == "lllite"


def test_lllite_file_for_another_layout(files, sd1_single_file, tmp_path):
    from sdbatch.errors import ModelError

    guidance = GuidanceConfig(name="lllite", models=[str(files.lllite)], guide_image=str(files.guides))
    with pytest.raises(ModelError, match=r"ControlNet-LLLite files are for SDXL .* SD1/SD2 model"):
        run_images(spec(sd1_single_file, steps=1, guidance=guidance), tmp_path / "sd1")
    assert Path(files.lllite).is_file()
