"""Guided sampling (guided=clip | clip_image | vgg16) on tiny random CLIP and VGG16 models: scale 0 is no guidance,
guidance lowers its own loss on every kind of sampler (and with v-prediction), no UNet gradient and flat memory,
clip_image's previous-batch target, whole runs with their metadata, ControlNet beside it, and bad input in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import init_images, max_diff, ours, pixels, spec
from guided_files import write_clip, write_vgg16
from hydra import compose, initialize_config_dir
from test_run import ROOT, SMALL, manifest, run_cli

from sdbatch.cli.runner import run
from sdbatch.config.guided_schema import GuidedConfig
from sdbatch.config.resolve import resolve
from sdbatch.config.schema import register_configs
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.features.guided import alpha_bar
from sdbatch.engine.guide.guided_models import (
    clip_image_embeddings,
    clip_text_embedding,
    load_guide_model,
    vgg16_layer_features,
)
from sdbatch.errors import SdbatchError
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.png_info import parse_infotext
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)
register_configs()

CPU = torch.device("cpu")
PROMPT = "a (red:1.2) cat"
TEXT = "a red cat"  # the prompt without weight syntax: guided=clip's target
BASE = ["model=tiny", "prompt=a cat", "seed=5", *SMALL]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("guide-models")
    clip, single = write_clip(folder)
    return {"clip": clip, "single": single, "vgg16": write_vgg16(folder / "vgg16-tiny.pth")}


@pytest.fixture(scope="module")
def guide(tmp_path_factory) -> Path:
    return init_images(tmp_path_factory.mktemp("guide-image"), [11])[0]


@pytest.fixture(autouse=True)
def _tiny_cache(cache_dir, monkeypatch) -> None:
    monkeypatch.setenv("SDBATCH_CACHE", str(cache_dir))


def clip_cfg(models: dict[str, Path], scale: float = 100.0, **keys) -> GuidedConfig:
    return GuidedConfig(kind="clip", clip_model=str(models["clip"]), clip_scale=scale, **keys)


def vgg_cfg(models: dict[str, Path], guide: Path, scale: float = 100.0) -> GuidedConfig:
    return GuidedConfig(kind="vgg16", vgg16_weights=str(models["vgg16"]), vgg16_scale=scale, guide_image=str(guide))


def generate(guided: GuidedConfig, sampler: str = "euler", seed: int = 3, **keys) -> np.ndarray:
    """One image from the engine with the guided settings (the guide image assigned as planning does)."""
    run_spec = spec("builtin:tiny", sampler=sampler, steps=5, guided=guided, **keys)
    if guided.guide_image is None:
        return ours(run_spec, [PROMPT], [seed])[0]
    job = dataclasses.replace(plan(run_spec, [PromptLine(PROMPT, "", "test")], base_seed=0)[0], seed=seed,
                              guided_image=guided.guide_image)
    return np.asarray(get_engine(run_spec.model, run_spec.perf).run_batch(Batch(BatchKey.of(job), (job,)))[0])


def tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


def clip_distance(models: dict[str, Path], image: np.ndarray) -> float:
    model = load_guide_model("clip", str(models["clip"]), CPU, "test")
    with torch.no_grad():
        embedding = clip_image_embeddings(model, tensor(image))[0]
    target = clip_text_embedding(model, TEXT, CPU)
    return float((embedding - target).norm().div(2).arcsin().pow(2).mul(2))


def vgg_distance(models: dict[str, Path], guide: Path, image: np.ndarray) -> float:
    model = load_guide_model("vgg16", str(models["vgg16"]), CPU, "test")
    with torch.no_grad():
        ours_, goal = (vgg16_layer_features(model, tensor(x), 20) for x in (image, pixels(guide)))
    return float(((ours_ - goal) ** 2).mean())


# ---------------------------------------------------------------- the guided step


def test_scale_zero_is_no_guidance(models) -> None:
    plain = generate(GuidedConfig())
    assert max_diff([generate(clip_cfg(models, 0.0))], [plain]) == 0
    assert max_diff([generate(clip_cfg(models, 100.0))], [plain]) > 0


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmsolver++"])
def test_clip_guidance_lowers_the_clip_distance(models, sampler) -> None:
    plain, guided = generate(GuidedConfig(), sampler), generate(clip_cfg(models, 1000.0), sampler)
    assert clip_distance(models, guided) < clip_distance(models, plain) - 0.05


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmsolver++"])
def test_vgg16_guidance_lowers_the_feature_distance(models, guide, sampler) -> None:
    plain, guided = generate(GuidedConfig(), sampler), generate(vgg_cfg(models, guide, 1000.0), sampler)
    assert vgg_distance(models, guide, guided) < vgg_distance(models, guide, plain)


def test_v_prediction_and_cutouts_are_guided_too(models) -> None:
    plain = generate(GuidedConfig(), v_pred=True)
    guided = generate(clip_cfg(models, 1000.0, cutouts=2), v_pred=True)
    assert clip_distance(models, guided) < clip_distance(models, plain)
    assert max_diff([generate(clip_cfg(models, 1000.0, cutouts=2), v_pred=True)], [guided]) == 0  # seeded cutouts


def test_an_image_is_guided_the_same_in_any_batch(models) -> None:
    """The loss is summed per image and cutouts come from each image's own generator."""
    run_spec = spec("builtin:tiny", sampler="euler_a", steps=4, guided=clip_cfg(models, 1000.0, cutouts=2))
    both = ours(run_spec, [PROMPT, "a blue dog"], [3, 4])
    assert max_diff([both[1]], ours(run_spec, ["a blue dog"], [4])) <= 1


@pytest.mark.parametrize(("sampler", "schedule"), [("euler", "karras"), ("dpmsolver++", "karras"), ("heun", "default"),
                                                   ("ddim", "default")])
def test_alpha_bar_is_the_noise_level_of_the_model_input(sampler, schedule) -> None:
    """Whatever the schedule, x_in = √ᾱ·x for a pure-noise x scaled to the call's sigma (Karras's fractional
    timesteps included); DDIM's ᾱ is alphas_cumprod[t]."""
    scheduler = make_scheduler(sampler, schedule, False)
    scheduler.set_timesteps(6)
    t = scheduler.timesteps[1]
    if hasattr(scheduler, "sigmas"):
        scheduler._init_step_index(scheduler.timesteps[0])
        scheduler._step_index = 1
        sigma = float(scheduler.sigmas[1])
        x = torch.ones(1, 4, 2, 2)
        scaled = scheduler.scale_model_input(x, t)
        expected = 1 / (1 + sigma**2)
        if float(scaled.mean()) != 1.0:  # the Euler family scales its input to the VP form
            assert float(scaled.mean()) == pytest.approx(expected**0.5, rel=1e-5)
    else:
        expected = float(scheduler.alphas_cumprod[int(t)])
    assert alpha_bar(scheduler, t) == pytest.approx(expected, rel=1e-5)


def test_no_unet_gradient_and_flat_memory_over_ten_images(models) -> None:
    run_spec = spec("builtin:tiny", sampler="euler", steps=2, guided=clip_cfg(models))
    engine = get_engine(run_spec.model, run_spec.perf)
    jobs = plan(dataclasses.replace(run_spec, images_per_prompt=10), [PromptLine(PROMPT, "", "t")], base_seed=0)
    resident = []
    with engine.session(run_spec):
        assert not any(p.requires_grad for p in engine.bundle.unet.parameters())
        for job in jobs:
            engine.run_batch(Batch(BatchKey.of(job), (job,)))
            resident.append(_rss())
    assert all(p.grad is None for p in engine.bundle.unet.parameters())
    assert all(p.grad is None for p in engine.bundle.vae.parameters())
    assert max(resident[3:]) - resident[2] < 32 * 2**20, resident  # no per-image growth past the warm-up


def _rss() -> int:
    """Resident memory of this process in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_single_file_clip_is_the_folder_model(models) -> None:
    folder = load_guide_model("clip", str(models["clip"]), CPU, "test")
    single = load_guide_model("clip", str(models["single"]), CPU, "test")
    assert torch.allclose(clip_text_embedding(folder, TEXT, CPU), clip_text_embedding(single, TEXT, CPU), atol=1e-6)


# ---------------------------------------------------------------- whole runs


def compose_spec(*overrides: str) -> RunSpec:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return resolve(compose("config", overrides=[*BASE, *overrides]))


def run_lines(run_dir: Path, *overrides: str) -> list[dict]:
    run(compose_spec(*overrides), run_dir)
    return sorted(manifest(run_dir), key=lambda line: line["index"])


def test_clip_image_without_a_guide_image_follows_the_previous_batch(models, tmp_path) -> None:
    keys = ["guided=clip_image", f"guided.clip_model={models['clip']}", "guided.clip_scale=1000"]
    first, second = run_lines(tmp_path / "a", *keys, "images_per_prompt=2", "sampler=euler")
    assert first["guided"]["guide_image"] == "previous batch: none (the first batch is not guided)"
    assert second["guided"]["guide_image"] == f"previous batch: {first['file']}"
    assert first["guided"]["hash"] and first["guided"]["kind"] == "clip_image"
    # the same image guided by that file on disk: the same pixels
    again = run_lines(tmp_path / "b", *keys, f"guided.guide_image={tmp_path / 'a' / first['file']}",
                      f"seed={second['seed']}", "sampler=euler")[0]
    assert again["guided"]["guide_image"] == str(tmp_path / "a" / first["file"])
    assert max_diff([pixels(tmp_path / "a" / second["file"])], [pixels(tmp_path / "b" / again["file"])]) <= 1


def test_vgg16_img2img_with_controlnet_records_both(models, guide, tmp_path) -> None:
    line = run_lines(tmp_path, "guided=vgg16", f"guided.vgg16_weights={models['vgg16']}", f"guided.guide_image={guide}",
                     f"init_image={guide}", "strength=0.6", "guidance=controlnet", "guidance.models=[builtin:tiny]",
                     f"guidance.guide_image={guide}", "sampler=dpmsolver++")[0]
    assert line["guided"] == {"kind": "vgg16", "model": str(models["vgg16"]), "scale": 100.0, "every_n_steps": 1,
                              "layer": 20, "guide_image": str(guide), "file": str(models["vgg16"]),
                              "hash": line["guided"]["hash"]}
    assert len(line["guided"]["hash"]) == 10 and line["guidance"]["units"][0]["model"] == "builtin:tiny"
    assert line["init_image"] == str(guide)


BAD = [
    (["guided=clip"], "guided.clip_model is not set; download laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    (["guided=clip", "guided.clip_model=nowhere/clip"], "guided.clip_model: no such file or folder nowhere/clip"),
    (["guided=vgg16", "guided.vgg16_weights=nowhere.pth"], "guided.vgg16_weights: no such file or folder"),
    (["guided=clip", "guided.clip_model=MODEL", "sampler=dpm_2"], "sampler.name=dpm_2 does not work with guided"),
    (["guided=clip", "guided.clip_model=MODEL", "guided.clip_scale=nan"], "guided.clip_scale must be a finite number"),
    (["guided=vgg16", "guided.vgg16_weights=VGG"], "guided=vgg16 needs guided.guide_image=FILE_OR_FOLDER"),
    (["guided=vgg16", "guided.vgg16_weights=VGG", "guided.guide_image=GUIDE", "guided.vgg16_layer=31"],
     "guided.vgg16_layer must be a VGG16 features index from 0 to 30"),
    (["guided=clip", "guided.clip_model=MODEL", "guided.every_n_steps=0"], "guided.every_n_steps must be 1 or more"),
    (["guided=clip", "guided.clip_model=MODEL", "guided.guide_image=GUIDE"],
     "guided.guide_image is set but guided=clip does not use it; drop it"),
    (["guided.clip_scale=5"], "guided.clip_scale is set but guided=none does not use it; add guided=clip to use it"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line(models, guide, overrides, needle) -> None:
    given = [o.replace("MODEL", str(models["clip"])).replace("VGG", str(models["vgg16"]))
             .replace("GUIDE", str(guide)) for o in overrides]
    with pytest.raises(SdbatchError, match=None) as err:
        compose_spec(*given)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unloadable_models_are_one_line(models, tmp_path) -> None:
    for kind, path, key in (("clip", models["vgg16"], "guided.clip_model"),
                            ("vgg16", models["single"], "guided.vgg16_weights")):
        with pytest.raises(SdbatchError) as err:
            load_guide_model(kind, str(path), CPU, key)
        assert str(err.value).startswith(f"{key}: ") and "\n" not in str(err.value)


@pytest.mark.slow
def test_run_py_end_to_end_clip_and_errors(models, guide, cache_dir, tmp_path) -> None:
    """`python run.py` with guided=clip (the single-file model, --c as the target) and img2img: metadata, the
    infotext's Guidance key; a scale that is not a number is one line."""
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny", "guided=clip", f"guided.clip_model={models['single']}", "guided.every_n_steps=2",
                    "prompt='a cat --c a red cat'", f"init_image={guide}", "strength=0.7", "sampler=unipc",
                    f"hydra.run.dir={run_dir}", "seed=4", *SMALL], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = manifest(run_dir)[0]
    assert line["guided"]["text"] == "a red cat" and line["guided"]["every_n_steps"] == 2
    assert line["guided"]["file"] == str(models["single"]) and line["init_image"] == str(guide)
    from PIL import Image

    info = parse_infotext(Image.open(run_dir / line["file"]).info["parameters"])
    assert info["Guidance"] == "clip 100"
    bad = run_cli(["model=tiny", "guided=clip", "guided.clip_scale=abc", "prompt=x"], cache_dir, tmp_path)
    assert bad.returncode == 2 and "guided.clip_scale" in bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr
