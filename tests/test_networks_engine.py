"""LoRA networks on the tiny SD1 models: file formats, name mapping (checked against diffusers' converter),
hooked vs merged maths, bit-exact restore, errors, load cache and the A1111 addnet hash."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from sdbatch.engine.features import lora_network as networks
from sdbatch.engine.features.lora_network import NetworkPatch, load_lora
from sdbatch.engine.models.tiny import build_tiny_components
from sdbatch.errors import ModelError

torch.set_num_threads(1)

RANK, ALPHA = 4, 2.0
# Module paths of the tiny SD1 UNet (diffusers 0.42: proj_in/proj_out are 1×1 Conv2d in the SD1 layout,
# Linear only with use_linear_projection, i.e. SD2) and of the transformers 5 text encoder (no text_model level).
UNET_LINEAR = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",  # 32 → 64: in ≠ out catches transposes
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",  # 64 → 512
]
UNET_CONV = {  # path → down kernel
    "down_blocks.1.attentions.0.proj_in": 1,  # 1×1 conv
    "up_blocks.0.resnets.1.conv_shortcut": 1,  # 1×1 conv, 96 → 64
    "down_blocks.0.resnets.0.conv1": 3,  # LoCon 3×3
    "down_blocks.0.downsamplers.0.conv": 3,  # LoCon 3×3, stride 2
    "down_blocks.1.resnets.0.conv1": 1,  # plain 1×1 LoRA on a 3×3 conv: the centre tap
}
TE_LINEAR = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


def kohya_name(path: str, text: bool = False) -> str:
    return ("lora_te_text_model_" if text else "lora_unet_") + path.replace(".", "_")


def lora_tensors(module: torch.nn.Module, gen: torch.Generator, kernel: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) for a Linear or Conv2d; large enough that the update clearly changes the outputs."""
    if isinstance(module, torch.nn.Linear):
        return (torch.randn(RANK, module.in_features, generator=gen) * 0.3,
                torch.randn(module.out_features, RANK, generator=gen) * 0.3)
    return (torch.randn(RANK, module.in_channels, kernel, kernel, generator=gen) * 0.3,
            torch.randn(module.out_channels, RANK, 1, 1, generator=gen) * 0.3)


def kohya_state(unet: torch.nn.Module, text_encoder: torch.nn.Module, seed: int = 1,
                alpha: float | None = ALPHA, text: bool = True) -> dict[str, torch.Tensor]:
    """A random kohya LoRA/LoCon state dict for the chosen UNet and text-encoder modules of these models."""
    gen = torch.Generator().manual_seed(seed)
    chosen = [(p, False, unet.get_submodule(p), 1) for p in UNET_LINEAR]
    chosen += [(p, False, unet.get_submodule(p), k) for p, k in UNET_CONV.items()]
    chosen += [(p, True, text_encoder.get_submodule(p), 1) for p in TE_LINEAR] if text else []
    state = {}
    for path, is_text, module, kernel in chosen:
        name = kohya_name(path, is_text)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = lora_tensors(module, gen, kernel)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture
def models(sd1_components):
    """Private copies of the tiny SD1 UNet and text encoder: tests patch them, the session fixture stays clean."""
    unet, _, text_encoder = sd1_components
    return copy.deepcopy(unet), copy.deepcopy(text_encoder)


@pytest.fixture
def kohya_file(models, tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = save(kohya_state(*models), tmp_path / "style.safetensors")
    return path, safetensors.torch.load_file(str(path))


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=gen)


@torch.no_grad()
def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    sample, t, context = unet_inputs()
    return unet(sample, t, encoder_hidden_states=context).sample


@torch.no_grad()
def te_out(text_encoder: torch.nn.Module) -> torch.Tensor:
    return text_encoder(torch.tensor([[49406, 320, 1125, 539, 49407]])).last_hidden_state


def module_input(module: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if isinstance(module, torch.nn.Linear):
        return torch.randn(2, 5, module.in_features, generator=gen)
    return torch.randn(2, module.in_channels, 8, 8, generator=gen)


def weights(*models: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for m in models for t in m.state_dict().values()]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# 1. hooked == merged == an independent weight update


@torch.no_grad()
def test_hooked_and_merged_match_independent_weight_update(models, kohya_file):
    unet, text_encoder = models
    path, state = kohya_file
    mul = 0.7
    linear = [(unet, p, False) for p in UNET_LINEAR] + [(text_encoder, p, True) for p in TE_LINEAR]
    all_modules = linear + [(unet, p, False) for p in UNET_CONV]
    inputs = {p: module_input(m.get_submodule(p)) for m, p, _ in all_modules}
    expected = {}
    for model, p, is_text in linear:  # W + mul·alpha/rank·(up @ down), straight from the file's tensors
        module, name = model.get_submodule(p), kohya_name(p, is_text)
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        weight = module.weight + mul * ALPHA / RANK * (up @ down)
        expected[p] = F.linear(inputs[p], weight, module.bias)
    original = {p: m.get_submodule(p)(inputs[p]) for m, p, _ in all_modules}
    base_unet, base_te = unet_out(unet), te_out(text_encoder)

    patch = NetworkPatch(unet, text_encoder, [load_lora(path)])
    patch.hook()
    patch.set_multipliers([mul])
    hooked = {p: m.get_submodule(p)(inputs[p]) for m, p, _ in all_modules}
    hooked_unet, hooked_te = unet_out(unet), te_out(text_encoder)
    patch.merge([mul])  # with the hooks still installed: they must not add the networks a second time
    merged = {p: m.get_submodule(p)(inputs[p]) for m, p, _ in all_modules}
    merged_unet, merged_te = unet_out(unet), te_out(text_encoder)
    patch.remove()

    for p, want in expected.items():
        torch.testing.assert_close(hooked[p], want, atol=1e-5, rtol=1e-5, msg=p)
        torch.testing.assert_close(merged[p], want, atol=1e-5, rtol=1e-5, msg=p)
    for p in UNET_CONV:  # convolution of the factors (hook) vs the composed kernel (merge): two different routes
        assert (hooked[p] - original[p]).abs().max() > 0.05, p
        torch.testing.assert_close(merged[p], hooked[p], atol=1e-5, rtol=1e-5, msg=p)
    assert (hooked_unet - base_unet).abs().max() > 1e-2 and (hooked_te - base_te).abs().max() > 1e-2
    torch.testing.assert_close(merged_unet, hooked_unet, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_te, hooked_te, atol=1e-4, rtol=1e-4)


# 2. our kohya names point at the modules diffusers' own converter resolves them to


def diffusers_module_paths(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """{module path: (lora_A, lora_B)} for the UNet and the text encoder, by diffusers' converters.

    _convert_non_diffusers_lora_to_diffusers gives old-diffusers names (``attn1.processor.to_q_lora.down.weight``,
    ``proj_in.lora.down.weight``, TE ``self_attn.to_q_lora.down.weight``, ``mlp.fc1.lora_linear_layer...``); the
    same PEFT conversions as diffusers' loaders turn them into ``<module path>.lora_A.weight``.
    """
    converted, _alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))  # it pops from its argument
    unet_sd = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    te_sd = {k.removeprefix("text_encoder."): v for k, v in converted.items() if k.startswith("text_encoder.")}
    unet_sd = convert_unet_state_dict_to_peft(unet_sd)
    # Without a to_out_lora key diffusers cannot infer the old format, so name it (its loader would mis-detect).
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd, StateDictType.DIFFUSERS_OLD))

    def pairs(sd: dict[str, torch.Tensor], drop: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd), list(sd)
        paths = {k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")}
        return {p.removeprefix(drop): (sd[f"{p}.lora_A.weight"], sd[f"{p}.lora_B.weight"]) for p in paths}

    return pairs(unet_sd), pairs(te_sd, "text_model.")  # transformers 5: no text_model level


@torch.no_grad()
def test_matched_modules_are_the_ones_diffusers_names(models, kohya_file):
    unet, text_encoder = models
    path, state = kohya_file
    unet_pairs, te_pairs = diffusers_module_paths(state)
    want = {id(unet.get_submodule(p)): ab for p, ab in unet_pairs.items()}
    want |= {id(text_encoder.get_submodule(p)): ab for p, ab in te_pairs.items()}
    assert len(want) == len(UNET_LINEAR) + len(UNET_CONV) + len(TE_LINEAR)
    candidates = [m for model in models for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    before = {id(m): m.weight.clone() for m in candidates}

    patch = NetworkPatch(unet, text_encoder, [load_lora(path)])
    patch.merge([1.0])
    changed = {id(m): m.weight - before[id(m)] for m in candidates if not torch.equal(m.weight, before[id(m)])}
    patch.remove()

    assert changed.keys() == want.keys()
    for key, delta in changed.items():  # and each got diffusers' own A/B pair for it
        down, up = want[key]
        if delta.ndim == 2:
            torch.testing.assert_close(delta, ALPHA / RANK * (up @ down), atol=1e-5, rtol=1e-5)


# 3. restore/remove are bit-exact; multipliers scale the update linearly; 0 is the original


@torch.no_grad()
def test_restore_and_remove_are_bit_exact(models, kohya_file):
    unet, text_encoder = models
    before, out_before, te_before = weights(unet, text_encoder), unet_out(unet), te_out(text_encoder)
    patch = NetworkPatch(unet, text_encoder, [load_lora(kohya_file[0])])
    patch.restore()  # nothing merged yet: a no-op
    assert identical(weights(unet, text_encoder), before)
    patch.hook()
    patch.merge([1.0])
    once = weights(unet, text_encoder)
    patch.merge([-0.5])
    patch.merge([1.0])  # each merge starts from the originals: no drift
    assert identical(weights(unet, text_encoder), once) and not identical(once, before)
    patch.restore()
    assert identical(weights(unet, text_encoder), before)
    assert not torch.equal(unet_out(unet), out_before)  # hooks active again after restore
    patch.merge([0.8])
    patch.remove()
    assert identical(weights(unet, text_encoder), before)
    assert torch.equal(unet_out(unet), out_before) and torch.equal(te_out(text_encoder), te_before)  # no hooks left


@torch.no_grad()
def test_multipliers(models, kohya_file):
    unet, text_encoder = models
    out_before = unet_out(unet)
    patch = NetworkPatch(unet, text_encoder, [load_lora(kohya_file[0])])
    patch.hook()
    patch.set_multipliers([0])
    assert torch.equal(unet_out(unet), out_before)
    for path in ["up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj", "down_blocks.0.resnets.0.conv1"]:
        module = unet.get_submodule(path)
        x = module_input(module)
        patch.set_multipliers([0])
        base = module(x)
        patch.set_multipliers([1.0])
        one = module(x) - base
        patch.set_multipliers([2.0])
        two = module(x) - base
        assert one.abs().max() > 0.05
        torch.testing.assert_close(two, 2 * one, atol=1e-5, rtol=1e-5)
    patch.remove()
    w = unet.get_submodule(UNET_LINEAR[0]).weight
    original = w.clone()
    patch.merge([1.0])
    d1 = w - original
    patch.merge([2.0])
    torch.testing.assert_close(w - original, 2 * d1, atol=1e-6, rtol=1e-5)
    patch.remove()


@torch.no_grad()
def test_two_networks_add_and_text_encoder_flag(models, tmp_path):
    unet, text_encoder = models
    a = load_lora(save(kohya_state(unet, text_encoder, seed=1), tmp_path / "a.safetensors"))
    b = load_lora(save(kohya_state(unet, text_encoder, seed=2, text=False), tmp_path / "b.safetensors"))
    assert NetworkPatch(unet, text_encoder, [a]).touches_text_encoder
    assert not NetworkPatch(unet, text_encoder, [b]).touches_text_encoder
    module = unet.get_submodule(UNET_LINEAR[2])
    x = module_input(module)
    base = module(x)
    deltas = []
    for loras, muls in (([a], [0.5]), ([b], [1.5]), ([a, b], [0.5, 1.5])):
        patch = NetworkPatch(unet, text_encoder, loras)
        patch.hook()
        patch.set_multipliers(muls)
        deltas.append(module(x) - base)
        patch.remove()
    torch.testing.assert_close(deltas[2], deltas[0] + deltas[1], atol=1e-5, rtol=1e-5)
    # Multiplier 0 skips a network's computation entirely: 0·inf would otherwise turn the output into NaN.
    broken = {k: torch.full_like(v, float("inf")) for k, v in kohya_state(unet, text_encoder, seed=3).items()}
    patch = NetworkPatch(unet, text_encoder, [a, load_lora(save(broken, tmp_path / "inf.safetensors"))])
    patch.hook()
    patch.set_multipliers([0.5, 0])
    torch.testing.assert_close(module(x) - base, deltas[0], atol=1e-5, rtol=1e-5)
    patch.remove()
    with pytest.raises(ValueError, match="2 networks"):
        NetworkPatch(unet, text_encoder, [a, b]).set_multipliers([1.0])


# 4. the diffusers/PEFT format reads to the same modules


@pytest.mark.parametrize("suffixes", [("lora_A.weight", "lora_B.weight"), ("lora.down.weight", "lora.up.weight")])
@torch.no_grad()
def test_diffusers_format_equals_kohya(models, tmp_path, suffixes):
    unet, text_encoder = models
    kohya = kohya_state(unet, text_encoder, alpha=None)  # no alpha: alpha = rank, scale 1 in both files
    peft = {}
    for path, prefix, text in ([(p, "unet.", False) for p in [*UNET_LINEAR, *UNET_CONV]]
                               + [(p, "text_encoder.text_model.", True) for p in TE_LINEAR]):
        name = kohya_name(path, text)
        peft[f"{prefix}{path}.{suffixes[0]}"] = kohya[f"{name}.lora_down.weight"]
        peft[f"{prefix}{path}.{suffixes[1]}"] = kohya[f"{name}.lora_up.weight"]
    from_kohya = load_lora(save(kohya, tmp_path / "k.safetensors"))
    from_peft = load_lora(save(peft, tmp_path / "p.safetensors"))
    assert from_peft.modules.keys() == from_kohya.modules.keys()
    for name, module in from_peft.modules.items():
        assert module.alpha == RANK and torch.equal(module.down, from_kohya.modules[name].down)
        assert torch.equal(module.up, from_kohya.modules[name].up)
    outs = []
    for lora in (from_kohya, from_peft):
        patch = NetworkPatch(unet, text_encoder, [lora])
        patch.hook()
        outs.append((unet_out(unet), te_out(text_encoder)))
        patch.remove()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# 5. errors: one ModelError naming the file


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelError, match="nope.safetensors not found; network.loras"):
        load_lora(tmp_path / "nope.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ModelError, match="garbage.safetensors"):
        load_lora(tmp_path / "garbage.safetensors")
    save({"model.weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ModelError, match="plain.safetensors holds no LoRA weights"):
        load_lora(tmp_path / "plain.safetensors")


def test_unsupported_and_incomplete_files(models, tmp_path):
    oft = {"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}
    with pytest.raises(ModelError, match="oft.safetensors is a LyCORIS OFT/BOFT network .*; LyCORIS OFT/BOFT "
                                         "networks are not supported"):
        load_lora(save(oft, tmp_path / "oft.safetensors"))
    state = kohya_state(*models)
    del state[f"{kohya_name(UNET_LINEAR[1])}.lora_up.weight"]
    with pytest.raises(ModelError, match=r"half.safetensors: module lora_unet_\w+attn2_to_k has no up"):
        load_lora(save(state, tmp_path / "half.safetensors"))


def test_unmatched_modules(models, tmp_path, caplog):
    unet, text_encoder = models
    state = kohya_state(unet, text_encoder)
    extra = {f"lora_unet_nowhere_{i}.{part}": torch.zeros(RANK, 8) for i in range(4) for part in
             ("lora_down.weight", "lora_up.weight")}
    lora = load_lora(save({**state, **extra}, tmp_path / "extra.safetensors"))
    with pytest.raises(ModelError, match=r"extra.safetensors: 4 of its 15 modules .*lora_unet_nowhere_0, "
                                         r"lora_unet_nowhere_1, lora_unet_nowhere_2\); set network.strict=false"):
        NetworkPatch(unet, text_encoder, [lora], strict=True)
    with caplog.at_level(logging.WARNING, logger=networks.__name__):
        NetworkPatch(unet, text_encoder, [lora]).remove()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "extra.safetensors" in warnings[0].getMessage()
    alien = load_lora(save(extra, tmp_path / "alien.safetensors"))
    with pytest.raises(ModelError, match="alien.safetensors does not fit this model: none of its 4 modules exist"):
        NetworkPatch(unet, text_encoder, [alien])


def test_lora_for_another_width(models, tmp_path):
    wide_unet, _, wide_te = build_tiny_components("sd1", 0, unet={"block_out_channels": (64, 128)},
                                                  text={"hidden_size": 64})
    lora = load_lora(save(kohya_state(wide_unet, wide_te), tmp_path / "wide.safetensors"))
    with pytest.raises(ModelError, match=r"wide.safetensors: module lora_\w+ is \d+→\d+.* in this model but "
                                         r"\d+→\d+ .*another model family"):
        NetworkPatch(*models, [lora])


# 6. torch files and the load cache


def test_pt_file_and_load_cache(models, tmp_path):
    state = kohya_state(*models)
    from_st = load_lora(save(state, tmp_path / "net.safetensors"))
    pt_path = save(state, tmp_path / "net.pt")
    count = networks.load_count()
    from_pt = load_lora(pt_path)
    assert load_lora(pt_path) is from_pt and load_lora(str(pt_path)) is from_pt
    assert networks.load_count() == count + 1
    assert from_pt.name == "net" and from_pt.modules.keys() == from_st.modules.keys()
    for name, module in from_pt.modules.items():
        assert torch.equal(module.down, from_st.modules[name].down) and module.alpha == ALPHA
    assert from_pt.hash == hashlib.sha256(pt_path.read_bytes()).hexdigest()[:12]
    stat = pt_path.stat()
    os.utime(pt_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited file is read again
    assert load_lora(pt_path) is not from_pt and networks.load_count() == count + 2


# 7. the A1111 addnet hash skips the safetensors header


def test_addnet_hash(models, tmp_path):
    state = kohya_state(*models)
    path = tmp_path / "hashed.safetensors"
    safetensors.torch.save_file(state, str(path), metadata={"ss_note": "one"})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    want = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    assert load_lora(path).hash == want
    renamed = tmp_path / "renamed.safetensors"
    safetensors.torch.save_file(state, str(renamed), metadata={"ss_note": "a longer, different note"})
    assert renamed.read_bytes() != data and load_lora(renamed).hash == want  # metadata edits keep the hash
