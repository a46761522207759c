"""SDXL: parity with diffusers' StableDiffusionXL(Img2Img)Pipeline, size conditioning, single file vs folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from engine_helpers import SIZE, init_images, max_diff, ours, ours_img2img, pixels, run_images, spec
from PIL import Image
from transformers import CLIPTokenizer

from sdbatch.config.highres_schema import HighresConfig
from sdbatch.config.sdxl_schema import SdxlConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.models.export import save_diffusers_folder
from sdbatch.engine.text.tokenizer import write_hf_tokenizer_files
from sdbatch.errors import ConfigError, ModelError
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.png_info import read_png_params
from sdbatch.prompts.sources import PromptLine
from sdbatch.prompts.syntax import parse_line

torch.set_num_threads(1)

PROMPTS = ["a lighthouse at dusk", "a red cube on a table"]
SEEDS = [11, 12345]
# non-default size conditioning, in diffusers' (height, width) / (top, left) order
SIZES = {"original_size": (96, 128), "crops_coords_top_left": (8, 16), "target_size": (64, 80)}
OURS = SdxlConfig(original_size=[96, 128], crop=[8, 16], target_size=[64, 80])
# The negative prompt's own sizes: diffusers stacks its time ids as [negative, prompt] and repeats that per image,
# which pairs them with the wrong rows in a batch of more than one prompt, so they are compared on one prompt.
# sdbatch's negative crop defaults to the prompt's (diffusers': 0,0, used only when both negative sizes are given).
NEGATIVE_SIZES = {**SIZES, "negative_original_size": (48, 64), "negative_crops_coords_top_left": (8, 16),
                  "negative_target_size": (72, 56)}
OURS_NEGATIVE = dataclasses.replace(OURS, negative_original_size=[48, 64], negative_target_size=[72, 56])


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, sdxl_components) -> Path:
    unet, vae, text, text_2 = sdxl_components
    return save_diffusers_folder(tmp_path_factory.mktemp("sdxl_dir") / "tiny-sdxl", unet, vae, text, "sdxl",
                                 text_encoder_2=text_2)


def _pipeline(components: tuple, tmp: Path, sampler: str, cls=StableDiffusionXLPipeline, **scheduler):
    unet, vae, text, text_2 = components
    tokenizer = CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(tmp / "tok", "<|endoftext|>"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(tmp / "tok2", "!"))
    return cls(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
               unet=unet, scheduler=make_scheduler(sampler, "default", **{"v_prediction": False, **scheduler}),
               force_zeros_for_empty_prompt=False)


def _reference(pipe, seeds: list[int], prompts: list[str] = PROMPTS, **kwargs) -> list[np.ndarray]:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompts, negative_prompt=["blurry"] * len(prompts), num_inference_steps=6, guidance_scale=7.5,
               generator=gens, output_type="pil", **kwargs)
    return [np.asarray(im) for im in out.images]


def _parity(sampler: str, components, file: Path, tmp: Path, prompts: list[str] = PROMPTS, sizes: dict = SIZES,
            sdxl: SdxlConfig = OURS) -> None:
    seeds = SEEDS[: len(prompts)]
    expected = _reference(_pipeline(components, tmp, sampler), seeds, prompts, height=SIZE, width=SIZE, **sizes)
    got = ours(spec(file, sampler=sampler, sdxl=sdxl), prompts, seeds, negative="blurry")
    assert max_diff(got, expected) <= 1


def test_sdxl_parity_with_size_conditioning(sdxl_components, sdxl_file, tmp_path) -> None:
    _parity("dpmpp_2m_karras", sdxl_components, sdxl_file, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a"])
def test_sdxl_parity_samplers(sampler, sdxl_components, sdxl_file, tmp_path) -> None:
    _parity(sampler, sdxl_components, sdxl_file, tmp_path)


@pytest.mark.slow
def test_sdxl_parity_with_negative_sizes(sdxl_components, sdxl_file, tmp_path) -> None:
    _parity("euler_a", sdxl_components, sdxl_file, tmp_path, PROMPTS[:1], NEGATIVE_SIZES, OURS_NEGATIVE)


def test_sdxl_img2img_parity(sdxl_components, sdxl_file, tmp_path) -> None:
    images = init_images(tmp_path, SEEDS)
    pipe = _pipeline(sdxl_components, tmp_path, "ddim", StableDiffusionXLImg2ImgPipeline)
    expected = _reference(pipe, SEEDS, image=[Image.open(p).convert("RGB") for p in images], strength=0.6)
    got = ours_img2img(spec(sdxl_file), PROMPTS, SEEDS, images, 0.6, negative="blurry")
    assert max_diff(got, expected) <= 1


def test_v_prediction_with_zero_terminal_snr_parity(sdxl_components, sdxl_file, tmp_path) -> None:
    """A v-prediction SDXL with sampler.zero_terminal_snr: diffusers' rescale_betas_zero_snr on the same weights."""
    pipe = _pipeline(sdxl_components, tmp_path, "euler", v_prediction=True, zero_terminal_snr=True)
    expected = _reference(pipe, SEEDS, height=SIZE, width=SIZE)
    run_spec = spec(sdxl_file, sampler="euler", v_pred=True)
    run_spec = dataclasses.replace(run_spec, sampler=dataclasses.replace(run_spec.sampler, zero_terminal_snr=True))
    lines = [PromptLine(p, "blurry", "test") for p in PROMPTS]
    jobs = [dataclasses.replace(job, seed=seed) for job, seed in zip(plan(run_spec, lines, 0), SEEDS, strict=True)]
    engine = get_engine(run_spec.model, run_spec.perf)
    with engine.session(run_spec):  # the run's sampler settings live in its session
        got = engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))
    assert pipe.scheduler.config.rescale_betas_zero_snr
    assert max_diff([np.asarray(im) for im in got], expected) <= 1


def test_single_file_and_folder_give_the_same_image(sdxl_file, sdxl_folder) -> None:
    file_images, folder_images = (ours(spec(src, steps=3), PROMPTS[:1], SEEDS[:1]) for src in (sdxl_file, sdxl_folder))
    assert max_diff(file_images, folder_images) <= 1


def _jobs(run_spec, lines: list[str]):
    parsed = [parse_line(line, f"t:{i}") for i, line in enumerate(lines)]
    jobs = plan(run_spec, [PromptLine(p.raw, "", p.origin) for p in parsed], base_seed=0)
    return [dataclasses.replace(job, seed=7) for job in jobs]


def test_batch_with_different_original_sizes_equals_images_alone(sdxl_file) -> None:
    run_spec = spec(sdxl_file, steps=3)
    jobs = _jobs(run_spec, ["a cat --ow 256 --oh 32", "a cat", "a cat --ow 48 --ct 16"])
    assert jobs[0].sdxl.original_size == (32, 256) and jobs[1].sdxl is None and jobs[2].sdxl.crop == (16, 0)
    assert len({BatchKey.of(job) for job in jobs}) == 3  # the size values go into the batch key
    engine = get_engine(run_spec.model, run_spec.perf)
    together = engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))
    for job, image in zip(jobs, together, strict=True):
        assert max_diff([np.asarray(engine.run_batch(Batch(BatchKey.of(job), (job,)))[0])], [np.asarray(image)]) <= 1
    assert max_diff([np.asarray(together[0])], [np.asarray(together[1])]) > 3  # --ow changes the image


def test_size_options_on_sd1_are_one_line_errors(sd1_single_file) -> None:
    run_spec = spec(sd1_single_file, steps=1)
    (job,) = _jobs(run_spec, ["a cat --ow 1024"])
    with pytest.raises(ConfigError, match=r"^t:0: SDXL size conditioning .* needs an SDXL model"):
        get_engine(run_spec.model, run_spec.perf).run_batch(Batch(BatchKey.of(job), (job,)))


def _token_rows(encoder, word: str) -> torch.Tensor:
    from sdbatch.engine.text.tokenizer import ClipTokenizer

    return encoder.get_input_embeddings().weight[ClipTokenizer().encode(word)].detach().clone()


def test_sdxl_textual_inversion_and_wrong_family_files(sdxl_file, sdxl_components, sd1_single_file, tmp_path) -> None:
    """An SDXL embedding (clip_l/clip_g) holding the token vectors of "lighthouse" draws what the word draws; an
    SD1 embedding on SDXL and an SDXL one on SD1 are one-line errors naming the key."""
    import safetensors.torch

    _, _, text, text_2 = sdxl_components
    xl = tmp_path / "lamp.safetensors"
    safetensors.torch.save_file({"clip_l": _token_rows(text, "lighthouse"),
                                 "clip_g": _token_rows(text_2, "lighthouse")}, str(xl))
    sd1 = tmp_path / "sd1emb.safetensors"
    safetensors.torch.save_file({"emb_params": torch.zeros(1, text.config.hidden_size)}, str(sd1))

    def run(file: Path, embedding: Path, prompt: str) -> list[np.ndarray]:
        run_spec = spec(file, steps=2)
        run_spec = dataclasses.replace(run_spec, model=dataclasses.replace(run_spec.model,
                                                                          textual_inversion=[str(embedding)]))
        jobs = [dataclasses.replace(j, seed=3) for j in plan(run_spec, [PromptLine(prompt, "", "t")], base_seed=0)]
        engine = get_engine(run_spec.model, run_spec.perf)
        with engine.session(run_spec):
            return [np.asarray(im) for im in engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))]

    assert max_diff(run(sdxl_file, xl, "a lamp at dusk"), run(sdxl_file, xl, "a lighthouse at dusk")) <= 1
    for model, embedding in ((sdxl_file, sd1), (sd1_single_file, xl)):
        with pytest.raises(ModelError, match=r"^model.textual_inversion: .* holds vectors of width"):
            run(model, embedding, "a cat")


def test_runner_highres_with_size_options(sdxl_file, tmp_path) -> None:
    """End to end through the runner: Highres. fix on SDXL, a line's --ow/--ct recorded, stage 1 = plain txt2img."""
    highres = HighresConfig(name="on", scale=0.5, steps=3, strength=0.5, save_first_stage=True)
    run_spec = spec(sdxl_file, steps=4, width=96, height=96, highres=highres, seed=5,
                    prompt="a red cube --ow 512 --ct 16")
    images, lines = run_images(run_spec, tmp_path / "run")
    first = [line for line in lines if line.get("stage") == 1]
    final = [line for line in lines if line.get("stage") != 1]
    assert [(line["width"], line["sdxl"]) for line in final] == [(96, {"original_size": [96, 512], "crop": [16, 0]})]
    assert read_png_params(tmp_path / "run" / final[0]["file"])["parameters"].startswith("a red cube\n")
    plain_spec = spec(sdxl_file, steps=3, width=48, height=48)
    (job,) = _jobs(plain_spec, ["a red cube --ow 512 --oh 96 --ct 16"])  # --oh: the final image's height
    job = dataclasses.replace(job, seed=first[0]["seed"])
    plain = get_engine(plain_spec.model, plain_spec.perf).run_batch(Batch(BatchKey.of(job), (job,)))
    assert max_diff([pixels(tmp_path / "run" / first[0]["file"])], [np.asarray(plain[0])]) == 0


def test_long_weighted_prompts_through_both_encoders(sdxl_components) -> None:
    """225 tokens and BREAK: 77-token chunks of both encoders side by side, pooled from the first chunk (A1111);
    a weight rescales each encoder's part to its own mean ('original' normalisation, as A1111 per embedder)."""
    from sdbatch.engine.text.encoder import TextEncoder
    from sdbatch.engine.text.tokenizer import ClipTokenizer

    _, _, text, text_2 = sdxl_components
    encoder = TextEncoder(ClipTokenizer(), text, text_encoder_2=text_2)
    width = text.config.hidden_size
    long = "a lighthouse at dusk BREAK " + ", ".join(["red cube"] * 60)
    batch = encoder.encode_texts([long, "a lighthouse at dusk"], None, clip_skip=1, max_multiples=3)
    assert batch.cond.shape == (2, 3 * 77, width + text_2.config.hidden_size) and batch.chunks == (3, 1)
    # the long prompt's first chunk is the short prompt (equal up to the rounding of other batch shapes)
    assert torch.allclose(batch.pooled[0], batch.pooled[1], atol=1e-5)
    assert torch.allclose(batch.cond[0, :77], batch.cond[1, :77], atol=1e-5)
    plain = encoder.encode_texts(["a lighthouse at dusk"], None, clip_skip=1).cond[0]
    weighted = encoder.encode_texts(["a (lighthouse:1.5) at dusk"], None, clip_skip=1).cond[0]
    for part in (slice(0, width), slice(width, None)):
        assert torch.allclose(weighted[:, part].mean(), plain[:, part].mean(), atol=1e-6)
        assert not torch.allclose(weighted[:, part], plain[:, part])


def test_family_is_read_from_the_keys(sdxl_file) -> None:
    """SGM keys with both embedders are SDXL; one embedder (a refiner's layout) or model.v2=true are one-line errors."""
    from sdbatch.engine.models.checkpoint import read_state_dict
    from sdbatch.engine.models.convert import SDXL_CLIP_PREFIX, detect_family
    from sdbatch.engine.models.file_info import model_file_info

    state = read_state_dict(sdxl_file)
    assert detect_family(state, "x") == "sdxl" and model_file_info(sdxl_file).family == "SDXL"
    with pytest.raises(ModelError, match="model.v2=true but x is an SDXL model"):
        detect_family(state, "x", v2="true")
    refiner = {k: v for k, v in state.items() if not k.startswith(SDXL_CLIP_PREFIX)}
    with pytest.raises(ModelError, match=r"without SDXL base's two text encoders \(a refiner\?\)"):
        detect_family(refiner, "x")


def test_bad_size_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"sdxl.crop must be \[top, left\]"):
        SdxlConfig(crop=[1, 2, 3]).check(None)
