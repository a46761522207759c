"""CLIP-Vision conditioning (clip_vision.*) on the tiny SDXL: the init image's image embedding × strength
replaces the prompt rows' pooled embedding only; batch invariance, records and one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from clip_vision_files import write_clip_vision, write_text_model
from engine_helpers import init_images, max_diff, run_images, spec
from hydra import compose, initialize_config_dir
from PIL import Image
from test_bad_config import CONF, _one_error_line
from test_run import SMALL, run_cli
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from sdbatch.config.clip_vision_schema import ClipVisionConfig
from sdbatch.config.resolve import resolve
from sdbatch.engine.core.conditioning import BatchText
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.features.clip_vision import with_image_pool
from sdbatch.errors import SdbatchError
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.plan.stage import plan_run
from sdbatch.prompts.png_info import read_png_params
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)
XL = "builtin:tiny_xl"
POOLED = 32  # the tiny SDXL's text_encoder_2 projection width
PROMPTS = ["a lighthouse at dusk", "a red cube on a table"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def suite_cache(cache_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDBATCH_CACHE", str(cache_dir))  # builtin:tiny_xl is built into the suite's cache
        yield patch


@pytest.fixture(scope="module")
def files(tmp_path_factory, suite_cache) -> dict:
    """The image encoder (projection 32, the tiny SDXL's pooled width), one projecting to 16, two init images."""
    tmp = tmp_path_factory.mktemp("clip_vision")
    return {"model": write_clip_vision(tmp / "vision", POOLED), "narrow": write_clip_vision(tmp / "narrow", 16),
            "text": write_text_model(tmp / "text"), "images": init_images(tmp, [1, 2]), "tmp": tmp}


def _spec(files: dict, strength: float | None, steps: int = 4):
    clip = ClipVisionConfig() if strength is None else ClipVisionConfig(str(files["model"]), strength)
    return spec(XL, steps=steps, init_image=str(files["images"][0]), strength=0.75, clip_vision=clip)


def _images(run_spec, files: dict, which: list[int]) -> list[np.ndarray]:
    """The engine's images of (PROMPTS[i], SEEDS[i], init image i) for i in `which`, in one batch."""
    lines = [PromptLine(PROMPTS[i], "blurry", "test", init_image=str(files["images"][i])) for i in which]
    jobs = [dataclasses.replace(job, seed=SEEDS[i]) for job, i in zip(plan(run_spec, lines, base_seed=0), which,
                                                                       strict=True)]
    engine = get_engine(run_spec.model, run_spec.perf)
    with engine.session(run_spec):
        return [np.asarray(im) for im in engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))]


def test_strength_zero_is_img2img_with_a_zero_prompt_pool(files, monkeypatch) -> None:
    """Strength 0 equals plain img2img whose prompt rows' pooled embedding is zeroed (negative pool and size
    values as they were), exactly; the pooled embedding does change the image."""
    zero = _images(_spec(files, 0.0), files, [0, 1])
    plain = _images(_spec(files, None), files, [0, 1])
    encode = BatchText.encode

    def zero_pool(self, block=None):
        cond = encode(self, block)
        return with_image_pool(cond, torch.zeros(cond.added.shape[0], POOLED))

    monkeypatch.setattr(BatchText, "encode", zero_pool)
    zeroed = _images(_spec(files, None), files, [0, 1])
    assert max_diff(zero, zeroed) == 0
    assert max_diff(zero, plain) > 0


def _pools_seen(run_spec, files: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_embeds, time_ids): the added conditioning of the UNet's first call for images 0 and 1 in one batch."""
    seen = []

    def hook(module, args, kwargs) -> None:
        if not seen:
            added = kwargs["added_cond_kwargs"]
            seen.append((added["text_embeds"].clone(), added["time_ids"].clone()))

    handle = get_engine(run_spec.model, run_spec.perf).bundle.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _images(run_spec, files, [0, 1])
    finally:
        handle.remove()
    return seen[0]


def test_the_unet_sees_the_image_embedding_on_the_prompt_rows_only(files) -> None:
    """With sampler.negative_scale (three CFG parts: negative, prompt, real unconditional): the prompt rows get
    image_embeds × strength, computed here with transformers' own processor and model; the negative and ""
    rows keep their text pools."""
    with_scale = {"sampler": dataclasses.replace(_spec(files, None).sampler, negative_scale=2.0)}
    plain, plain_sizes = _pools_seen(dataclasses.replace(_spec(files, None, steps=2), **with_scale), files)
    got, sizes = _pools_seen(dataclasses.replace(_spec(files, 0.5, steps=2), **with_scale), files)
    model = CLIPVisionModelWithProjection.from_pretrained(files["model"]).eval()
    images = [Image.open(path).convert("RGB") for path in files["images"]]  # 64², the images' own size
    with torch.no_grad():
        expected = model(**CLIPImageProcessorPil()(images=images, return_tensors="pt")).image_embeds * 0.5
    assert got.shape == (6, POOLED)
    torch.testing.assert_close(got[2:4], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:2], plain[:2]) and torch.equal(got[4:], plain[4:])
    assert not torch.allclose(plain[2:4], expected) and torch.equal(sizes, plain_sizes)


def test_strength_changes_the_image_and_batches_equal_images_alone(files) -> None:
    run_spec = _spec(files, 1.0)
    together = _images(run_spec, files, [0, 1])
    alone = [_images(run_spec, files, [i])[0] for i in (0, 1)]
    assert max_diff(together, alone) <= 1
    assert max_diff(together, _images(_spec(files, 0.0), files, [0, 1])) > 3


def test_run_records_the_model_and_strength(files, tmp_path) -> None:
    run_spec = dataclasses.replace(_spec(files, 0.5, steps=3), prompt=PROMPTS[0])
    _, lines = run_images(run_spec, tmp_path / "run")
    entry = lines[0]["clip_vision"]
    assert entry["strength"] == 0.5 and entry["name"] == "vision" and len(entry["hash"]) == 10
    assert Path(entry["file"]) == files["model"].resolve() and entry["model"] == str(files["model"])
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert config["model_hashes"][entry["file"]] == entry["hash"]
    params = read_png_params(tmp_path / "run" / lines[0]["file"])
    assert f'CLIP-Vision: "vision [{entry["hash"][:8]}], 0.5"' in params["parameters"]
    assert params["sdbatch"]["clip_vision"] == entry


def test_run_py_end_to_end(files, cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny_xl", "prompt=a lighthouse", f"init_image={files['images'][0]}", *SMALL,
                    f"clip_vision.model={files['model']}", "clip_vision.strength=0.5", f"hydra.run.dir={run_dir}"],
                   cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = (run_dir / "manifest.jsonl").read_text().splitlines()
    assert json.loads(line)["clip_vision"]["strength"] == 0.5


def _bad(files: dict, tmp_path: Path, sd1: Path) -> list[tuple[list[str], str]]:
    """(overrides, text of the one error line) for each bad input."""
    base = ["prompt=a lighthouse", f"init_image={files['images'][0]}", *SMALL]
    return [
        (["model=tiny_xl", *base, f"clip_vision.model={tmp_path / 'nowhere'}"], "clip_vision.model: no such folder"),
        (["model=tiny_xl", "prompt=x", *SMALL, f"clip_vision.model={files['model']}"],
         "clip_vision.model needs init_image"),
        (["model=tiny_xl", *base, "clip_vision.strength=0.5"], "clip_vision.strength is set but clip_vision.model"),
        ([f"model.checkpoint={sd1}", "model.v2=false", *base, f"clip_vision.model={files['model']}"],
         "clip_vision.model: CLIP-Vision conditioning replaces SDXL's pooled text embedding"),
        (["model=tiny_xl", *base, f"clip_vision.model={files['narrow']}"],
         "projects images to 16 values but this SDXL model's pooled text embedding has 32"),
        (["model=tiny_xl", *base, f"clip_vision.model={files['text']}"], "is not a CLIPVisionModelWithProjection"),
    ]


def test_bad_inputs_are_one_line_errors(files, tmp_path, sd1_single_file) -> None:
    """In process, as run.py meets them: config checks before any model loads, then the model checks when the
    session opens (before any image)."""
    for overrides, message in _bad(files, tmp_path, sd1_single_file):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        with pytest.raises(SdbatchError) as caught:
            run_spec = resolve(cfg)
            plan_run(run_spec, base_seed=0)
            with get_engine(run_spec.model, run_spec.perf).session(run_spec):
                pass
        assert message in str(caught.value) and "\n" not in str(caught.value), overrides


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(files, cache_dir, tmp_path, sd1_single_file) -> None:
    for overrides, message in _bad(files, tmp_path, sd1_single_file):
        proc = run_cli([*overrides, f"hydra.run.dir={tmp_path / 'bad'}"], cache_dir, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert message in _one_error_line(proc.stderr)
