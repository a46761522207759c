"""PNG metadata written: an image's parameters (manifest line, `sdbatch` chunk) and A1111's infotext."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from typing import Any

from PIL import PngImagePlugin

from sdbatch import __version__
from sdbatch.config.sampler_registry import a1111_eta, a1111_name, a1111_schedule, effective_schedule
from sdbatch.config.spec import LoraConfig, RunSpec, image_features
from sdbatch.plan.jobs import ControlNetRef, EmbeddingRef, GuideModelRef, ImageJob, ModelInfo, NetworkRef
from sdbatch.prompts.couple import part_count, split_parts
from sdbatch.prompts.embedding_names import used_names
from sdbatch.prompts.extra_networks import TAG
from sdbatch.prompts.region_masks import region_shares

# ---------------------------------------------------------------- parameters


def image_params(job: ImageJob, model: ModelInfo, version: str, vae_fallback: Collection[str] = (),
                 records: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The full, JSON-able parameters of one image: manifest line and `sdbatch` PNG chunk.

    `vae_fallback`: the file names whose half-precision VAE decode gave NaN/inf and was redone in fp32 (the engine's
    `vae_fallback`); such an image records "vae_fallback": "fp32", every other one null. `records`: what features
    added at run time, by file name and feature (the engine's `records`), merged into the feature's entry.
    """
    params: dict[str, Any] = {
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
        **({"zero_terminal_snr": True} if model.zero_terminal_snr else {}),  # only when set: older records match
        "precision": model.precision,
        "vae_fallback": "fp32" if job.file_name in vae_fallback else None,
        "tome_ratio": model.tome_ratio or None,  # the accelerators (perf.*): they change pixels; None = off
        "deepcache": dict(zip(("interval", "branch"), model.deepcache, strict=True)) if model.deepcache else None,
        "origin": job.origin,
        "raw_prompt": job.raw_prompt,
        "clip_prompt": job.clip_prompt,
    }
    for name in image_features(RunSpec):  # highres, deep_shrink, gradual_latent, ...: None when off
        params[name] = _record(job.features.get(name), job)
    _name_controlnets(params.get("guidance"), model.controlnets)
    _name_guide_model(params.get("guided"), model.guide_models)
    for name, entry in ((records or {}).get(job.file_name) or {}).items():
        params[name] = {**(params.get(name) or {}), **entry}
    params["regions"] = _regions(job, model)
    return {**params, "index": job.index, "sdbatch_version": version}


def _embeddings_used(job: ImageJob, embeddings: tuple[EmbeddingRef, ...]) -> list[dict[str, str]]:
    """The run's (X)TI embeddings that the prompt or negative prompt uses, in config order."""
    used = set(used_names([job.prompt, job.negative_prompt], [e.name for e in embeddings]))
    return [{"name": e.name, "file": e.file, "hash": e.hash} for e in embeddings if e.name in used]


def _networks_used(job: ImageJob, networks: tuple[NetworkRef, ...]) -> list[dict[str, Any]]:
    """The run's networks with this image's multipliers (--am, a <lora:> tag, or network.loras[].mul/unet_mul):
    `mul` for the text encoder, `unet_mul` for the UNet (the same number unless they differ)."""
    muls = job.network_muls or ()
    return [{"name": n.name, "file": n.file, "hash": n.hash, "mul": te, "unet_mul": unet, "merged": n.merged}
            for n, (te, unet) in zip(networks, map(LoraConfig.split, muls), strict=False)]


def _lora_hashes(params: Mapping[str, Any]) -> str | None:
    """A1111's `Lora hashes` value, "name: hash, name2: hash" for the networks with a non-zero multiplier."""
    used = [n for n in params.get("networks") or [] if n["mul"] or n.get("unet_mul")]
    entries = [f"{n['name'].replace(':', '').replace(',', '')}: {n['hash']}" for n in used]
    return ", ".join(entries) or None


def _ti_hashes(params: Mapping[str, Any]) -> str | None:
    """A1111's `TI hashes` value, "name: hash, name2: hash" (names without `:` and `,`); None if none used."""
    used = params.get("textual_inversion") or []
    entries = [f"{e['name'].replace(':', '').replace(',', '')}: {e['hash']}" for e in used]
    return ", ".join(entries) or None


def _name_controlnets(record: dict[str, Any] | None, refs: tuple[ControlNetRef, ...]) -> None:
    """Each ControlNet unit of an image's record gets its model's name, resolved file and hash (in model order)."""
    for unit, ref in zip((record or {}).get("units", ()), refs, strict=False):
        unit.update(name=ref.name, file=ref.file, hash=ref.hash)


def _name_guide_model(record: dict[str, Any] | None, refs: tuple[GuideModelRef, ...]) -> None:
    """Guided sampling's record gets its model's resolved file and hash."""
    if record is not None and refs:
        record.update(file=refs[0].file, hash=refs[0].hash)


def _regions(job: ImageJob, model: ModelInfo) -> dict[str, Any] | None:
    """An AND prompt's parts (text, weight, share of the image, and with network.regional the network bound to
    it), its mask and how the mask was read; None for a prompt without AND."""
    if part_count(job.prompt) < 2:
        return None
    parts = split_parts(job.prompt, job.origin)
    shares = region_shares(job.region_mask, [p.weight for p in parts], job.width, job.height, job.region_codes)
    return {"mask": job.region_mask, "max_color_codes": job.region_codes,
            "parts": [{"text": p.text, "weight": p.weight, "share": share, "network": _bound(model, k)}
                      for k, (p, share) in enumerate(zip(parts, shares, strict=True))]}


def _bound(model: ModelInfo, part: int) -> str | None:
    """The network bound to AND part `part` (network.regional: network i ↔ part i), or None."""
    if not model.regional_networks or part >= len(model.networks):
        return None
    return model.networks[part].name


def _record(settings: Any, job: ImageJob) -> dict[str, Any] | None:
    """An image's settings of one feature as a plain dict: their `record(job)`, else their fields; None = off."""
    if settings is None:
        return None
    return settings.record(job) if hasattr(settings, "record") else dataclasses.asdict(settings)


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
    schedule = params.get("schedule") or effective_schedule(params["sampler"], "default")
    return {
        "Steps": hires.get("steps", params["steps"]),  # A1111: Steps and Size are the first pass's
        "Sampler": a1111_name(params["sampler"]),
        "Schedule type": a1111_schedule(params["sampler"], schedule),  # always: missing means "Automatic"
        "CFG scale": _number(params["cfg_scale"]),
        "Seed": params["seed"],
        "Size": f"{hires.get('first_width', params['width'])}x{hires.get('first_height', params['height'])}",
        "Model hash": params.get("model_hash"),
        "Model": params.get("model"),
        "VAE hash": params.get("vae_hash") if has_vae else None,
        "VAE": params.get("vae") if has_vae else None,
        "Denoising strength": _denoising_strength(params),
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Token merging ratio": _number(params.get("tome_ratio")),  # A1111's key (its hires pass uses it too)
        "DeepCache": _deepcache(params.get("deepcache")),  # ours: A1111 has no such key
        "RNG": "CPU",  # noise comes from per-image CPU generators (engine/core/noise.py); missing means GPU
        **{key: _number(value) for key, value in a1111_eta(params["sampler"], params.get("eta") or 0.0).items()},
        **_hires_size(params, hires),
        "Hires steps": params["steps"] if hires else None,  # the second pass's sampler.steps
        "Hires upscaler": hires.get("upscaler_name"),
        **_controlnet_fields(params),
        "Guidance": _guided_field(params),
        "CLIP-Vision": _clip_vision_field(params),
        "Lora hashes": _lora_hashes(params),
        "TI hashes": _ti_hashes(params),
        "Version": f"sdbatch {params.get('sdbatch_version', __version__)}",
    }


def _deepcache(settings: Mapping[str, Any] | None) -> str | None:
    return f"interval {settings['interval']}, branch {settings['branch']}" if settings else None


def _hires_size(params: Mapping[str, Any], hires: Mapping[str, Any]) -> dict[str, Any]:
    """`Hires upscale: S` when A1111 rebuilds the final size from it (int(first × S)), else `Hires resize: WxH`."""
    if not hires:
        return {}
    width, height = params["width"], params["height"]
    scale = _number(round(width / hires["first_width"], 4))
    if int(hires["first_width"] * scale) == width and int(hires["first_height"] * scale) == height:
        return {"Hires upscale": scale}
    return {"Hires resize": f"{width}x{height}"}


def _controlnet_fields(params: Mapping[str, Any]) -> dict[str, str]:
    """`ControlNet N: "Module: canny, Model: NAME [HASH], Weight: 1.0, ..."`, as A1111's ControlNet extension
    writes (and reads back) one entry per unit; a unit's own `,` and `:` make quote() wrap the whole value."""
    units = (params.get("guidance") or {}).get("units") or []
    return {f"ControlNet {i}": (f"Module: {_module(unit['preprocess'])}, Model: {_model_label(unit)}, "
                                f"Weight: {float(unit['weight'])}, Guidance Start: {float(unit['start'])}, "
                                f"Guidance End: {float(unit['ratio'])}")
            for i, unit in enumerate(units)}


def _guided_field(params: Mapping[str, Any]) -> str | None:
    """`Guidance: clip 100` for guided sampling (sdbatch's own key; A1111 has none)."""
    guided = params.get("guided")
    return f"{guided['kind']} {_number(float(guided['scale']))}" if guided else None


def _clip_vision_field(params: Mapping[str, Any]) -> str | None:
    """`CLIP-Vision: "NAME [HASH], 0.5"`: CLIP-Vision conditioning's model and strength (sdbatch's own key: A1111
    has no CLIP-Vision conditioning); the folder's path when the model's name is not recorded."""
    entry = params.get("clip_vision")
    if not entry:
        return None
    return f"{_model_label(entry)}, {_number(float(entry['strength']))}"


def _module(preprocess: str) -> str:
    """A1111's module name: none, canny (thresholds are its Threshold A/B, not part of the name), invert."""
    return "canny" if preprocess.lower().startswith("canny") else preprocess


def _model_label(unit: Mapping[str, Any]) -> str:
    """`NAME [HASH]` (A1111 writes the model's name and its short hash in brackets); the path when not loaded."""
    name = unit.get("name") or unit["model"]
    return f"{name} [{unit['hash'][:8]}]" if unit.get("hash") else name


def _denoising_strength(params: Mapping[str, Any]) -> Any:
    """img2img's strength, or Highres. fix's second-pass strength; None for txt2img."""
    if params.get("highres"):
        return _number(params["highres"]["strength"])
    return _number(params.get("strength")) if params.get("init_image") else None


def infotext(params: Mapping[str, Any]) -> str:
    """AUTOMATIC1111's `parameters` text: prompt (with the run's LoRAs as `<lora:>` tags), optional
    `Negative prompt:` line, parameters line."""
    fields = _a1111_fields(params)
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = params.get("negative_prompt") or ""
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    prompt = " ".join(part for part in (params["prompt"], *lora_tags(params)) if part)
    return f"{prompt}{negative_text}\n{line}".strip()


def lora_tags(params: Mapping[str, Any]) -> list[str]:
    """`<lora:NAME:MUL>` (or `<lora:NAME:TE:UNET>`) for each network the image used that its prompt does not tag,
    so that A1111's "send to txt2img" applies it; networks bound to an AND region and zero weights are left out."""
    written = {match[1].split(":")[0].strip() for match in TAG.finditer(params["prompt"])}
    regional = {part["network"] for part in (params.get("regions") or {}).get("parts", ())}
    result = []
    for net in params.get("networks") or []:
        te, unet = net["mul"], net.get("unet_mul", net["mul"])
        if net["name"] in written or net["name"] in regional or not (te or unet):
            continue
        weights = f"{_number(unet)}" if te == unet else f"{_number(te)}:{_number(unet)}"
        result.append(f"<lora:{net['name']}:{weights}>")
    return result


# ---------------------------------------------------------------- PNG text chunks


def reference_keys(params: Mapping[str, Any]) -> dict[str, str]:
    """The reference tool's (gen_img.py) own PNG text keys, so that it reads sdbatch's images back."""
    keys = {"prompt": params["prompt"], "seed": str(params["seed"]), "sampler": params["sampler"],
            "steps": str(params["steps"]), "scale": str(float(params["cfg_scale"])),
            "negative-prompt": params.get("negative_prompt") or ""}
    if params.get("negative_scale") is not None:
        keys["negative-scale"] = str(params["negative_scale"])
    if params.get("clip_prompt"):
        keys["clip-prompt"] = params["clip_prompt"]
    keys["raw-prompt"] = params.get("raw_prompt") or params["prompt"]
    return keys


def pnginfo(params: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    """The PNG text chunks of an image: `parameters` (A1111 infotext), the reference tool's keys (`prompt`, `seed`,
    ...) and `sdbatch` (the JSON parameters)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(params))  # Pillow falls back to iTXt for non-Latin-1 text, as A1111
    for key, value in reference_keys(params).items():
        info.add_text(key, value)
    info.add_text("sdbatch", json.dumps(params))
    return info
