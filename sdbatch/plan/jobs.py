"""Plain value records that travel from planning to outputs: one ImageJob per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ImageJob:
    """Everything that decides one image, plus where it goes."""

    index: int  # position of the image in the run (0-based); stable whatever the batching
    file_name: str  # e.g. "00003-1237.png", deterministic, no timestamps
    prompt: str  # the prompt as encoded: dynamic parts expanded, weights as written
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    sampler: str  # sdbatch sampler name, e.g. "euler_a", "dpmpp_2m"
    schedule: str  # default | karras | exponential
    cfg_scale: float
    eta: float
    origin: str  # where the prompt came from: "prompt", "prompt[2]", "prompts.txt:14"
    raw_prompt: str = ""  # the line as written, options included
    negative_scale: float | None = None  # --nl (separate negative-prompt scale)
    strength: float | None = None  # --t (img2img)
    network_muls: tuple[float, ...] | None = None  # --am
    clip_prompt: str | None = None  # --c (recorded only)
    deep_shrink: Any = None  # --dsd1 ... (sdbatch.prompts.syntax.DeepShrink)
    gradual_latent: Any = None  # --glt ... (sdbatch.prompts.syntax.GradualLatent)
    init_image: str | None = None  # img2img: path of the init image file (None = txt2img)
    mask_image: str | None = None  # inpainting: path of the mask file (white = repaint); needs init_image
    highres: Any = None  # Highres. fix settings (sdbatch.config.spec.HighresConfig) or None


@dataclass(frozen=True, slots=True)
class EmbeddingRef:
    """A Textual Inversion embedding active in the run: its prompt name, file and A1111 short hash."""

    name: str  # the prompt token (file name without extension)
    file: str  # resolved path of the embedding file
    hash: str  # first 12 hex digits of the file's sha256 (A1111 "TI hashes")


@dataclass(frozen=True, slots=True)
class NetworkRef:
    """A LoRA-family network active in the run: its name, file and A1111 short hash."""

    name: str  # file name without extension (A1111's Lora name)
    file: str  # resolved path
    hash: str  # A1111 "Lora hashes": first 12 hex of the sha256 of the safetensors data (after the header)
    merged: bool = False  # network.mode=merge: in the weights at network.loras[].mul for the whole run


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the outputs need to know about the loaded model (names and short hashes)."""

    name: str  # checkpoint file stem (A1111 "Model")
    hash: str  # first 10 hex digits of the file's sha256 (A1111 "AutoV2" / "Model hash")
    family: str  # "sd1" | "sd2"
    v_prediction: bool
    clip_skip: int  # 1 = last text-encoder layer
    precision: str  # fp32 | fp16 | bf16 (as actually used)
    vae_name: str | None = None
    vae_hash: str | None = None
    embeddings: tuple[EmbeddingRef, ...] = ()  # model.textual_inversion of the run; images record those they use
    xti_embeddings: tuple[EmbeddingRef, ...] = ()  # model.xti_embeddings of the run, the same way
    networks: tuple[NetworkRef, ...] = ()  # network.loras of the run, in order (an image's network_muls match)
