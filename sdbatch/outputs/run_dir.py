"""Outputs: the run directory, PNG metadata (A1111 infotext + sdbatch JSON), manifest.jsonl and resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image, PngImagePlugin

from sdbatch import __version__
from sdbatch.errors import OutputError
from sdbatch.plan.highres_stage import record as highres_record
from sdbatch.plan.jobs import EmbeddingRef, ImageJob, ModelInfo, NetworkRef
from sdbatch.prompts.embedding_names import used_names
from sdbatch.config.sampler_registry import a1111_name, a1111_schedule, effective_schedule

MANIFEST = "manifest.jsonl"
CONFIG = "config.yaml"
GRID = "grid.png"

# A1111 modules/infotext_utils.py: one `key: value` pair of the parameters line, and an image size value.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


# ---------------------------------------------------------------- parameters


def image_params(job: ImageJob, model: ModelInfo, version: str) -> dict[str, Any]:
    """The full, JSON-able parameters of one image: manifest line and `sdbatch` PNG chunk."""
    return {
        "file": job.file_name,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "steps": job.steps,
        "sampler": job.sampler,
        # the schedule actually run: "dpmpp_2m_karras" with schedule "default" records "karras"
        "schedule": effective_schedule(job.sampler, job.schedule),
        "cfg_scale": job.cfg_scale,
        "eta": job.eta,
        "strength": job.strength,
        "init_image": job.init_image,
        "mask_image": job.mask_image,
        "highres": highres_record(job),
        "negative_scale": job.negative_scale,
        "networks": _networks_used(job, model.networks),
        "network_muls": list(job.network_muls) if job.network_muls is not None else None,
        "textual_inversion": _embeddings_used(job, model.embeddings),
        "xti_embeddings": _embeddings_used(job, model.xti_embeddings),
        "clip_skip": model.clip_skip,
        "model": model.name,
        "model_hash": model.hash,
        "vae": model.vae_name,
        "vae_hash": model.vae_hash,
        "v_prediction": model.v_prediction,
        "precision": model.precision,
        "origin": job.origin,
        "raw_prompt": job.raw_prompt,
        "clip_prompt": job.clip_prompt,
        "deep_shrink": _record(job.deep_shrink),
        "gradual_latent": _record(job.gradual_latent),
        "index": job.index,
        "sdbatch_version": version,
    }


def _embeddings_used(job: ImageJob, embeddings: tuple[EmbeddingRef, ...]) -> list[dict[str, str]]:
    """The run's (X)TI embeddings that the prompt or negative prompt uses, in config order."""
    used = set(used_names([job.prompt, job.negative_prompt], [e.name for e in embeddings]))
    return [{"name": e.name, "file": e.file, "hash": e.hash} for e in embeddings if e.name in used]


def _networks_used(job: ImageJob, networks: tuple[NetworkRef, ...]) -> list[dict[str, Any]]:
    """The run's networks with this image's multipliers (--am or network.loras[].mul)."""
    muls = job.network_muls or ()
    return [{"name": n.name, "file": n.file, "hash": n.hash, "mul": mul, "merged": n.merged}
            for n, mul in zip(networks, muls, strict=False)]


def _lora_hashes(params: Mapping[str, Any]) -> str | None:
    """A1111's `Lora hashes` value, "name: hash, name2: hash" for the networks with a non-zero multiplier."""
    used = [n for n in params.get("networks") or [] if n["mul"]]
    entries = [f"{n['name'].replace(':', '').replace(',', '')}: {n['hash']}" for n in used]
    return ", ".join(entries) or None


def _ti_hashes(params: Mapping[str, Any]) -> str | None:
    """A1111's `TI hashes` value, "name: hash, name2: hash" (names without `:` and `,`); None if none used."""
    used = params.get("textual_inversion") or []
    entries = [f"{e['name'].replace(':', '').replace(',', '')}: {e['hash']}" for e in used]
    return ", ".join(entries) or None


def _record(value: Any) -> Any:
    """A frozen options record (Deep Shrink, Gradual Latent) as a plain dict; None stays None."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# ---------------------------------------------------------------- A1111 infotext


def _number(value: Any) -> Any:
    """Numbers as A1111 prints them: 7.0 → 7, 7.5 → 7.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def quote(value: Any) -> str:
    """A1111's quote(): JSON-quote a value only when it holds `,`, a newline or `:`."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _a1111_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """The `key: value` entries of the parameters line, in A1111's create_infotext order."""
    clip_skip = params.get("clip_skip") or 1
    has_vae = bool(params.get("vae"))
    hires = params.get("highres") or {}
    return {
        "Steps": hires.get("steps", params["steps"]),  # A1111: Steps and Size are the first pass's
        "Sampler": a1111_name(params["sampler"]),
        "Schedule type": a1111_schedule(params.get("schedule") or "default"),
        "CFG scale": _number(params["cfg_scale"]),
        "Seed": params["seed"],
        "Size": f"{hires.get('first_width', params['width'])}x{hires.get('first_height', params['height'])}",
        "Model hash": params.get("model_hash"),
        "Model": params.get("model"),
        "VAE hash": params.get("vae_hash") if has_vae else None,
        "VAE": params.get("vae") if has_vae else None,
        "Denoising strength": _denoising_strength(params),
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Hires upscale": _number(round(params["width"] / hires["first_width"], 4)) if hires else None,
        "Hires steps": params["steps"] if hires else None,  # the second pass's sampler.steps
        "Hires upscaler": hires.get("upscaler_name"),
        "Lora hashes": _lora_hashes(params),
        "TI hashes": _ti_hashes(params),
        "Version": f"sdbatch {params.get('sdbatch_version', __version__)}",
    }


def _denoising_strength(params: Mapping[str, Any]) -> Any:
    """img2img's strength, or Highres. fix's second-pass strength; None for txt2img."""
    if params.get("highres"):
        return _number(params["highres"]["strength"])
    return _number(params.get("strength")) if params.get("init_image") else None


def infotext(params: Mapping[str, Any]) -> str:
    """AUTOMATIC1111's `parameters` text: prompt, optional `Negative prompt:` line, parameters line."""
    fields = _a1111_fields(params)
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = params.get("negative_prompt") or ""
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{params['prompt']}{negative_text}\n{line}".strip()


def _split_prompts(lines: Iterable[str]) -> tuple[str, str]:
    """Prompt and negative prompt from the text lines above the parameters line."""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative)


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _parse_params_line(line: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, raw in RE_PARAM.findall(line):
        if not raw:  # A1111 fails on an empty value and skips the entry
            continue
        value = _unquote(raw)
        size = RE_IMAGESIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def parse_infotext(text: str) -> dict[str, str]:
    """Read infotext back as A1111's parse_generation_parameters does (values stay strings)."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    result = _parse_params_line(last)
    result["Prompt"], result["Negative prompt"] = _split_prompts(lines)
    result.setdefault("Clip skip", "1")  # a missing Clip skip means 1
    return result


# ---------------------------------------------------------------- PNG files


def read_png_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `parameters` (infotext) and `sdbatch` (parsed JSON) text chunks of a PNG; None where absent."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except OSError as exc:
        raise OutputError(f"cannot read image metadata from {path}: {exc}; check that it is a PNG") from None
    data = text.get("sdbatch")
    try:
        parsed = json.loads(data) if data else None
    except ValueError:
        parsed = None
    return {"parameters": text.get("parameters"), "sdbatch": parsed if isinstance(parsed, dict) else None}


def _pnginfo(params: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(params))  # Pillow falls back to iTXt for non-Latin-1 text, as A1111
    info.add_text("sdbatch", json.dumps(params))
    return info


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- run directory


class RunDir:
    """One run's output directory: config.yaml, images written atomically, manifest.jsonl, resume."""

    def __init__(self, path: Path, *, resume: bool = True) -> None:
        self.path = Path(path)
        self.resume = resume
        self.manifest = self.path / MANIFEST
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PermissionError("permission denied")
            self._done = self._load_manifest()
        except OSError as exc:
            raise OutputError(
                f"cannot write to output directory {self.path}: {exc.strerror or exc}; "
                "set hydra.run.dir to a writable folder"
            ) from None

    def _load_manifest(self) -> set[str]:
        """Files listed by complete manifest lines; a partial last line (killed process) is cut off."""
        if not self.manifest.exists():
            return set()
        data = self.manifest.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        records = [_json_line(line) for line in lines]
        last = _json_line(tail) if tail else None
        if tail:
            self._repair_tail(len(data) - len(tail), complete=last is not None)
        records.append(last)
        return {rec["file"] for rec in records if rec and isinstance(rec.get("file"), str)}

    def _repair_tail(self, offset: int, *, complete: bool) -> None:
        """Terminate a whole last record, or drop a partial one, so the next append starts a fresh line."""
        with open(self.manifest, "r+b") as fh:
            if complete:
                fh.seek(0, os.SEEK_END)
                fh.write(b"\n")
            else:
                fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())

    def write_config(self, resolved: Mapping[str, Any] | DictConfig, models: Mapping[str, str]) -> Path:
        """Write config.yaml: the resolved run spec, the sdbatch version and {model file: short sha256}."""
        if isinstance(resolved, DictConfig):
            resolved = OmegaConf.to_container(resolved, resolve=True)
        data = {**dict(resolved), "sdbatch_version": __version__, "model_hashes": dict(models)}
        text = OmegaConf.to_yaml(OmegaConf.create(data))
        target = self.path / CONFIG
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _write_error(target, exc) from None
        return target

    def done_files(self) -> set[str]:
        """File names already listed in manifest.jsonl (from earlier runs and this one)."""
        return set(self._done)

    def is_done(self, job: ImageJob) -> bool:
        """True when resuming and the image is both in the manifest and on disk."""
        return self.resume and job.file_name in self._done and (self.path / job.file_name).is_file()

    def save(self, image: Image.Image, params: Mapping[str, Any]) -> Path:
        """Write the PNG atomically with its metadata, then append its manifest line."""
        target = self.path / params["file"]
        try:
            self._write_png(image, params, target)
            self._append_manifest(params)
        except OSError as exc:
            raise _write_error(target, exc) from None
        self._done.add(params["file"])
        return target

    def save_grid(self, files: list[str], cols: int) -> Path:
        """grid.png: the given images in order, `cols` per row, each cell as large as the largest image."""
        images = [Image.open(self.path / name).convert("RGB") for name in files]
        cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
        cols = max(1, min(cols, len(images)))
        grid = Image.new("RGB", (cols * cell_w, math.ceil(len(images) / cols) * cell_h))
        for i, im in enumerate(images):
            grid.paste(im, ((i % cols) * cell_w, (i // cols) * cell_h))
        return self.save_sheet(grid, GRID)

    def save_sheet(self, image: Image.Image, name: str) -> Path:
        """A contact sheet or grid image in the run directory, written atomically, without metadata."""
        target = self.path / name
        try:
            self._write_png(image, None, target)
        except OSError as exc:
            raise _write_error(target, exc) from None
        return target

    def _write_png(self, image: Image.Image, params: Mapping[str, Any] | None, target: Path) -> None:
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with open(tmp, "wb") as fh:
                image.save(fh, format="PNG", pnginfo=_pnginfo(params) if params is not None else None)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)

    def _append_manifest(self, params: Mapping[str, Any]) -> None:
        line = json.dumps(dict(params), ensure_ascii=False) + "\n"
        with open(self.manifest, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def _write_error(target: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {target}: {exc.strerror or exc}; check free space and permissions")


def _json_line(line: bytes) -> dict[str, Any] | None:
    """One manifest record, or None for a blank, partial or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
