"""LyCORIS LoHa and LoKr, DoRA and LoCon with a CP core on the tiny SD1 models: each weight change against its
formula computed here independently, hooked == merged, multiplier 0 is the plain model, per-image multipliers,
images across modes, and the formats still refused."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from engine_helpers import max_diff, run_images, spec
from lycoris_files import (
    ALPHA,
    RANK,
    UNET_CONV3,
    UNET_LINEAR,
    kohya_name,
    loha_state,
    lokr_state,
    lora_state,
    save,
    targets,
    with_dora,
)

from sdbatch.config.spec import LoraConfig, NetworkConfig
from sdbatch.engine.features.lora_network import ROW_MULTIPLIERS, NetworkPatch, load_lora
from sdbatch.errors import ModelError

torch.set_num_threads(1)

ON_INPUT = (kohya_name(UNET_CONV3[2]), kohya_name(UNET_LINEAR[1]))  # DoRA magnitudes per input channel there
KINDS = ["loha", "loha_tucker", "lokr", "dora", "loha_dora", "lokr_dora", "cp"]


def _state(kind: str, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    base, _, dora = kind.partition("_dora")
    state = {"loha": lambda: loha_state(modules, seed=1), "loha_tucker": lambda: loha_state(modules, 2, tucker=True),
             "lokr": lambda: lokr_state(modules, seed=3), "dora": lambda: lora_state(modules, seed=4),
             "cp": lambda: lora_state(modules, seed=5, cp=True)}[base]()
    return with_dora(state, modules, seed=6, on_input=ON_INPUT) if kind.endswith("dora") else state


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd1_components) -> dict[str, Path]:
    unet, _, text_encoder = sd1_components
    folder = tmp_path_factory.mktemp("lycoris")
    modules = targets(unet, text_encoder)
    return {kind: save(_state(kind, modules), folder / f"{kind}.safetensors") for kind in KINDS}


@pytest.fixture
def models(sd1_components):
    unet, _, text_encoder = sd1_components
    return copy.deepcopy(unet), copy.deepcopy(text_encoder)


# 1. each weight change equals its formula, written out here


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_pq core[p, q] · a[p] ⊗ b[q], by explicit loops."""
    out = 0
    for p in range(core.shape[0]):
        for q in range(core.shape[1]):
            out = out + core[p, q] * a[p][:, None, None, None] * b[q][None, :, None, None]
    return out


def _kron_blocks(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The Kronecker product built block by block: block (i, j) is w1[i, j] · w2."""
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:])
    for i in range(a):
        for j in range(c):
            out[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


def expected_delta(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW at multiplier 1 from one module's file tensors (by key suffix), before DoRA."""
    shape = weight.shape
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            factors = [_tucker(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]) for i in "12"]
        else:
            factors = [(t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"]).reshape(shape) for i in "12"]
        return factors[0] * factors[1] * ALPHA / t["hada_w1_b"].shape[0]
    if any(key.startswith("lokr_") for key in t):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        b, d = (t["lokr_w2"].shape[:2] if "lokr_w2" in t else
                (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]) if "lokr_t2" in t else
                (t["lokr_w2_a"].shape[0], shape[1] // w1.shape[1]))
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(b, d, *shape[2:])
        decomposed = "lokr_w1" not in t or "lokr_w2" not in t
        return _kron_blocks(w1, w2).reshape(shape) * (ALPHA / RANK if decomposed else 1.0)
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if "lora_mid.weight" in t:
        return _tucker(t["lora_mid.weight"], up.flatten(1).T, down.flatten(1)) * ALPHA / RANK
    if weight.dim() == 2:
        return up @ down * ALPHA / RANK
    return torch.einsum("or,rikl->oikl", up.flatten(1), down) * ALPHA / RANK


def expected_change(t: dict[str, torch.Tensor], weight: torch.Tensor, on_input: bool) -> torch.Tensor:
    """W' − W: ΔW, or with dora_scale W' = dora_scale · (W + ΔW)/‖W + ΔW‖ per output (or input) channel."""
    delta = expected_delta(t, weight)
    if "dora_scale" not in t:
        return delta
    merged = weight + delta
    channels = merged.transpose(0, 1) if on_input else merged
    norms = torch.stack([channel.norm() for channel in channels])  # one norm per channel, by a loop
    norms = norms.view(1, -1, *[1] * (weight.dim() - 2)) if on_input else norms.view(-1, *[1] * (weight.dim() - 1))
    return t["dora_scale"] * merged / norms - weight


def _by_module(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in safetensors.torch.load_file(str(path)).items():
        name, _, suffix = key.partition(".")
        parts.setdefault(name, {})[suffix] = tensor
    return parts


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_weight_change_is_the_formula(models, files, kind) -> None:
    unet, text_encoder = models
    modules = targets(unet, text_encoder)
    before = {name: m.weight.clone() for name, m in modules.items()}
    patch = NetworkPatch(unet, text_encoder, [load_lora(files[kind])])
    errors = []
    for mul in (1.0, 0.6):
        patch.merge([mul])
        for name, tensors in _by_module(files[kind]).items():
            want = mul * expected_change(tensors, before[name], name in ON_INPUT)
            got = modules[name].weight - before[name]
            assert got.abs().max() > 1e-3, f"{name} changes"
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{kind} {name} at {mul}")
            errors.append(float((got - want).abs().max()))
    patch.remove()
    assert all(torch.equal(modules[name].weight, w) for name, w in before.items()), "restored bit-exactly"
    print(f"{kind}: max |ΔW error| {max(errors):.2e}")


# 2. hooked == merged; multiplier 0 is the plain model; per-image multipliers in one UNet call


def _unet_call(unet: torch.nn.Module, rows=None) -> torch.Tensor:
    from sdbatch.engine.core.rows import calling

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen).repeat(2, 1, 1, 1)  # 2 images × 2 CFG halves
    context = torch.randn(4, 7, 32, generator=gen)
    with torch.no_grad(), calling(rows):
        return unet(x, torch.tensor(500), encoder_hidden_states=context).sample


@torch.no_grad()
def _text(text_encoder: torch.nn.Module) -> torch.Tensor:
    return text_encoder(torch.tensor([[49406, 320, 1125, 539, 49407]])).last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_hooked_equals_merged_and_zero_is_plain(models, files, kind) -> None:
    from sdbatch.engine.core.rows import NEGATIVE, PROMPT, Rows

    unet, text_encoder = models
    plain, plain_text = _unet_call(unet), _text(text_encoder)
    patch = NetworkPatch(unet, text_encoder, [load_lora(files[kind])])
    try:
        patch.hook()
        patch.set_multipliers([0.0])
        assert torch.equal(_unet_call(unet), plain) and torch.equal(_text(text_encoder), plain_text)
        patch.set_multipliers([0.7])
        hooked, hooked_text = _unet_call(unet), _text(text_encoder)
        rows = Rows.of_images(2).stacked([NEGATIVE, PROMPT])
        mixed = _unet_call(unet, rows.with_image_data(**{ROW_MULTIPLIERS: torch.tensor([[0.0], [0.7]])}))
        patch.merge([0.7])
        merged, merged_text = _unet_call(unet), _text(text_encoder)
        patch.merge([0.0])
        assert torch.equal(_unet_call(unet), plain), "merged at 0: the original weights"
    finally:
        patch.remove()
    assert (hooked - plain).abs().max() > 1e-2 and (hooked_text - plain_text).abs().max() > 1e-2
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_text, hooked_text, atol=1e-4, rtol=1e-4)
    assert torch.equal(mixed[[0, 2]], plain[[0, 2]]), "image 0 at multiplier 0: the plain UNet"
    torch.testing.assert_close(mixed[[1, 3]], hooked[[1, 3]], atol=1e-5, rtol=1e-5)


def test_peft_dora_magnitudes_equal_lycoris_dora(models, files, tmp_path) -> None:
    """diffusers/PEFT keys: lora_A/lora_B and lora_magnitude_vector (per output channel, (out,) or 4-D)."""
    unet, text_encoder = models
    paths = [p for p in UNET_LINEAR + UNET_CONV3 if kohya_name(p) not in ON_INPUT]  # PEFT: per output channel
    every = safetensors.torch.load_file(str(files["dora"]))
    kohya = {k: v for k, v in every.items() if k.split(".")[0] in {kohya_name(p) for p in paths}}
    peft = {}
    for path in paths:
        name = kohya_name(path)
        peft[f"unet.{path}.lora_A.weight"] = kohya[f"{name}.lora_down.weight"]
        peft[f"unet.{path}.lora_B.weight"] = kohya[f"{name}.lora_up.weight"]
        peft[f"unet.{path}.alpha"] = kohya[f"{name}.alpha"]
        magnitude = kohya[f"{name}.dora_scale"].flatten()  # Linear (out,), Conv2d (1, out, 1, 1) as PEFT stores them
        peft[f"unet.{path}.lora_magnitude_vector.weight"] = magnitude.view(-1 if path in UNET_LINEAR else (1, -1, 1, 1))
    outs = []
    for state, name in ((kohya, "k"), (peft, "p")):
        patch = NetworkPatch(unet, text_encoder, [load_lora(save(state, tmp_path / f"{name}.safetensors"))])
        patch.merge([1.0])
        outs.append(_unet_call(unet))
        patch.remove()
    assert torch.equal(outs[0], outs[1])


# 3. images: hooked, merge and precalc agree; 0 is the plain model; --am per image in one hooked batch


def _with(run_spec, path: Path, mul: float, mode: str = "hooked"):
    return dataclasses.replace(run_spec, network=NetworkConfig(
        name="lora", loras=[LoraConfig(path=str(path), mul=mul)], mode=mode, strict=True))


@pytest.mark.parametrize("kind", ["loha", "loha_tucker", "lokr", "dora", "lokr_dora", "cp"])
def test_images_agree_across_modes(sd1_single_file, files, tmp_path, kind) -> None:
    base = spec(sd1_single_file, prompt="a red cube", seed=5)
    plain = run_images(base, tmp_path / "plain")[0]
    hooked = run_images(_with(base, files[kind], 0.8), tmp_path / "hooked")[0]
    assert max_diff(hooked, plain) > 8, "the network changes the image"
    diffs = {mode: max_diff(run_images(_with(base, files[kind], 0.8, mode), tmp_path / mode)[0], hooked)
             for mode in ("merge", "precalc")}
    print(f"{kind}: vs plain {max_diff(hooked, plain)}, image diff vs hooked {diffs}")
    assert max(diffs.values()) <= 1
    assert max_diff(run_images(_with(base, files[kind], 0.0), tmp_path / "zero")[0], plain) == 0
    mixed = spec(sd1_single_file, prompt=["a red cube --am 0 --d 5", "a red cube --am 0.8 --d 5"], batch_size=2)
    images, lines = run_images(_with(mixed, files[kind], 0.3), tmp_path / "mixed")
    assert max_diff(images[:1], plain) <= 1 and max_diff(images[1:], hooked) <= 1  # a batch of 2 vs 1: ≤ 1 level
    assert [line["networks"][0]["mul"] for line in lines] == [0.0, 0.8]


# 4. formats still refused, and files that do not fit: one ModelError naming the file


@pytest.mark.parametrize(("keys", "algorithm"), [
    ({"oft_blocks": (2, 4, 4)}, "LyCORIS OFT/BOFT"), ({"oft_diag": (2, 4, 4)}, "kohya OFT"),
    ({"a1.weight": (4, 4), "a2.weight": (4, 4)}, "LyCORIS GLoRA"), ({"weight": (4,), "on_input": ()}, r"\(IA\)³"),
    ({"diff": (64, 64)}, r"full \(diff\)"), ({"w_norm": (64,)}, "LyCORIS norm"),
    ({"lokr_t1": (4, 4), "lokr_w1_a": (8, 4), "lokr_w1_b": (4, 8), "lokr_w2": (8, 8)}, "lokr_t1"),
])
def test_unsupported_algorithms_are_refused_by_name(tmp_path, keys, algorithm) -> None:
    name = kohya_name(UNET_LINEAR[0])
    path = save({f"{name}.{k}": torch.zeros(shape) for k, shape in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match=rf"other.safetensors is a [^;]*{algorithm}[^;]* network \(module {name}\); "
                                         r".* networks are not supported \(LoRA, LoCon, LoHa, LoKr and DoRA are\)"):
        load_lora(path)


def test_broken_and_misfit_lycoris_files(models, tmp_path) -> None:
    unet, text_encoder = models
    name = kohya_name(UNET_LINEAR[0])  # 64 → 64
    good = loha_state({name: unet.get_submodule(UNET_LINEAR[0])})
    with pytest.raises(ModelError, match=rf"half.safetensors: module {name} is LoHa but has no hada_w2_b"):
        load_lora(save({k: v for k, v in good.items() if not k.endswith("w2_b")}, tmp_path / "half.safetensors"))
    bad = {**good, f"{name}.hada_w1_b": torch.zeros(RANK + 1, 64)}
    with pytest.raises(ModelError, match=r"bad.safetensors: module \w+: the LoHa factors do not fit together"):
        NetworkPatch(unet, text_encoder, [load_lora(save(bad, tmp_path / "bad.safetensors"))])
    wide = loha_state({name: torch.nn.Linear(64, 128)})
    with pytest.raises(ModelError, match=r"wide.safetensors: module \w+ is \(64, 64\) in this model but its LoHa "
                                         r"update is \(128, 64\) .*another model family"):
        NetworkPatch(unet, text_encoder, [load_lora(save(wide, tmp_path / "wide.safetensors"))])
    dora = {**lora_state({name: unet.get_submodule(UNET_LINEAR[0])}), f"{name}.dora_scale": torch.ones(7, 1)}
    with pytest.raises(ModelError, match=r"dora.safetensors: module \w+: its DoRA magnitudes \(7, 1\) fit neither"):
        NetworkPatch(unet, text_encoder, [load_lora(save(dora, tmp_path / "dora.safetensors"))])


def test_a1111_hash_of_a_lycoris_file(files) -> None:
    data = files["lokr"].read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert load_lora(files["lokr"]).hash == hashlib.sha256(data[8 + header :]).hexdigest()[:12]
