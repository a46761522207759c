"""SDXL networks on a tiny SDXL-layout UNet and both text encoders: kohya's SGM module names, kohya SDXL LoRA
against diffusers' own SDXL LoRA conversion, ControlNet-LLLite against kohya's module maths, the wrong-family
and wrong-layout errors, LLLite's config keys and records."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lora_files import make_lora
from lycoris_files import loha_state, lokr_state
from PIL import Image
from safetensors.torch import load_file, save_file
from sdxl_net_files import diffusers_merged, diffusers_peft, kohya_sdxl_lora, lllite_state, tiny_sdxl, unet_inputs

from sdbatch.config.guidance_schema import GuidanceConfig, Preprocess
from sdbatch.config.lllite_schema import LLLiteSettings, LLLiteUnit
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.core.rows import Rows, calling
from sdbatch.engine.features import lllite as lllite_feature
from sdbatch.engine.features.lllite import LLLitePatch, with_lllite
from sdbatch.engine.features.lora_network import ROW_MULTIPLIERS, NetworkPatch, load_lora, module_map
from sdbatch.engine.models.lllite_files import load_lllite
from sdbatch.engine.models.sdxl_names import sgm_paths
from sdbatch.errors import ConfigError, ModelError
from sdbatch.outputs.metadata import _controlnet_fields

torch.set_num_threads(1)
RANK, ALPHA = 4, 2.0
# the layers a kohya SDXL LoRA/LoCon trains: transformer Linears and 1×1s, resnet convs, samplers, CLIP's
UNET_ENDS = ("attn1_to_q", "attn1_to_v", "attn2_to_k", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in",
             "proj_out", "in_layers_2", "out_layers_3", "skip_connection", "emb_layers_1", "_op", "_2_conv")
TE_ENDS = ("q_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def xl():
    return tiny_sdxl()


@pytest.fixture(scope="module")
def lora_file(xl, tmp_path_factory) -> Path:
    names = module_map(xl.unet, xl.text_encoder, xl.text_encoder_2)
    picked = {n: m for n, m in names.items() if n.endswith(UNET_ENDS if n.startswith("lora_unet_") else TE_ENDS)}
    return kohya_sdxl_lora(tmp_path_factory.mktemp("xl") / "xl_lora.safetensors", picked, RANK, ALPHA)


@torch.no_grad()
def outputs(xl) -> dict[str, torch.Tensor]:
    x, emb, added = unet_inputs()
    ids = torch.tensor([[0, 5, 9, 17, 2]])
    te2 = xl.text_encoder_2(ids, output_hidden_states=True)
    return {"unet": xl.unet(x, 500, emb, added_cond_kwargs=added).sample,
            "te1": xl.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
            "te2": te2.hidden_states[-2], "pooled": te2.text_embeds}


def test_sgm_names_cover_every_layer_once(xl):
    layers = [p for p, m in xl.unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    paths = sgm_paths(xl.unet)
    assert sorted(paths) == sorted(layers) and len(set(paths.values())) == len(layers)
    names = module_map(xl.unet, xl.text_encoder, xl.text_encoder_2)
    assert len(names) == len(layers) + sum(isinstance(m, torch.nn.Linear) for te in (xl.text_encoder,
                                                                                      xl.text_encoder_2)
                                           for m in te.modules())
    # SDXL's own numbering: 2 layers per block, samplers in their own input block, upsamplers after attention
    for name, path in {"input_blocks_0_0": "conv_in", "time_embed_2": "time_embedding.linear_2",
                       "label_emb_0_0": "add_embedding.linear_1",
                       "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
                       "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
                       "input_blocks_8_1_transformer_blocks_1_attn2_to_k":
                           "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
                       "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
                       "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
                       "output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
                       "output_blocks_8_0_emb_layers_1": "up_blocks.2.resnets.2.time_emb_proj",
                       "out_2": "conv_out"}.items():
        assert names["lora_unet_" + name] is xl.unet.get_submodule(path), name
    te1, te2 = xl.text_encoder.encoder.layers, xl.text_encoder_2.text_model.encoder.layers
    assert names["lora_te2_text_model_encoder_layers_1_mlp_fc2"] is te2[1].mlp.fc2
    assert names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] is te1[0].self_attn.q_proj


@torch.no_grad()
def test_sdxl_lora_equals_diffusers_conversion(xl, lora_file):
    reference, converted = diffusers_merged(xl, lora_file, ALPHA / RANK)
    lora = load_lora(lora_file)
    assert converted == len(lora.modules)  # diffusers resolved every module of the file
    want, base = outputs(reference), outputs(xl)
    patch = NetworkPatch(xl.unet, xl.text_encoder, [lora], strict=True, text_encoder_2=xl.text_encoder_2)
    patch.hook()
    hooked = outputs(xl)
    patch.merge([1.0])
    merged = outputs(xl)
    patch.remove()
    for name in want:
        assert (want[name] - base[name]).abs().max() > 1e-2, name  # the LoRA really acts on every output
        torch.testing.assert_close(hooked[name], want[name], atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(merged[name], want[name], atol=1e-4, rtol=1e-4, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(outputs(xl).values(), base.values(), strict=True))


@torch.no_grad()
def test_diffusers_format_sdxl_lora_equals_kohya(xl, lora_file, tmp_path):
    peft = {f"{prefix}.{key}": value for prefix, part in diffusers_peft(xl, lora_file).items()
            for key, value in part.items()}
    peft |= {key.replace(".lora_A.weight", ".alpha"): torch.tensor(ALPHA) for key in peft if "lora_A" in key}
    save_file(peft, str(tmp_path / "peft.safetensors"))
    weights, models = {}, (xl.unet, xl.text_encoder, xl.text_encoder_2)
    for path in (lora_file, tmp_path / "peft.safetensors"):  # strict: every module of the file is matched
        patch = NetworkPatch(xl.unet, xl.text_encoder, [load_lora(path)], strict=True, text_encoder_2=xl.text_encoder_2)
        patch.merge([1.0])
        weights[path] = [p.clone() for model in models for p in model.parameters()]
        patch.remove()
    peft_file = load_lora(tmp_path / "peft.safetensors")
    assert peft_file.diffusers_keys and len(peft_file.modules) == len(load_lora(lora_file).modules)
    for kohya, diffusers in zip(*weights.values(), strict=True):
        torch.testing.assert_close(diffusers, kohya, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_text_encoder_multiplier_reaches_both_encoders(xl, lora_file):
    base = outputs(xl)
    patch = NetworkPatch(xl.unet, xl.text_encoder, [load_lora(lora_file)], text_encoder_2=xl.text_encoder_2)
    assert patch.touches_text_encoder
    patch.hook()
    patch.set_multipliers([(0.0, 1.0)])
    te_off = outputs(xl)
    patch.set_multipliers([(1.0, 0.0)])
    unet_off = outputs(xl)
    patch.remove()
    for name in ("te1", "te2", "pooled"):
        assert torch.equal(te_off[name], base[name]) and not torch.equal(unet_off[name], base[name]), name
    assert torch.equal(unet_off["unet"], base["unet"]) and not torch.equal(te_off["unet"], base["unet"])


@torch.no_grad()
def test_per_image_unet_multipliers_on_sdxl(xl, lora_file):
    x, emb, added = unet_inputs(2, 8)
    call = lambda: xl.unet(x, 500, emb, added_cond_kwargs=added).sample  # noqa: E731
    base = call()
    patch = NetworkPatch(xl.unet, xl.text_encoder, [load_lora(lora_file)], text_encoder_2=xl.text_encoder_2)
    patch.hook()
    full = call()
    rows = Rows.of_images(2).with_image_data(**{ROW_MULTIPLIERS: torch.tensor([[0.0], [1.0]])})
    with calling(rows):
        mixed = call()
    patch.remove()
    torch.testing.assert_close(mixed[0], base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], full[1], atol=1e-5, rtol=1e-5)
    assert (full[1] - base[1]).abs().max() > 1e-2


@pytest.mark.parametrize("make", [loha_state, lokr_state])
@torch.no_grad()
def test_lycoris_on_sdxl_names(xl, tmp_path, make):
    names = module_map(xl.unet, xl.text_encoder, xl.text_encoder_2)
    picked = {n: names[n] for n in ("lora_unet_input_blocks_4_0_in_layers_2", "lora_unet_output_blocks_2_2_conv",
                                    "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_k",
                                    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj")}
    save_file(make(picked), str(tmp_path / "lyco.safetensors"))
    base, before = outputs(xl), {id(m): m.weight.clone() for m in names.values()}
    patch = NetworkPatch(xl.unet, xl.text_encoder, [load_lora(tmp_path / "lyco.safetensors")], strict=True,
                         text_encoder_2=xl.text_encoder_2)
    patch.hook()
    hooked = outputs(xl)
    patch.merge([1.0])
    merged = outputs(xl)
    changed = {id(m) for m in names.values() if not torch.equal(m.weight, before[id(m)])}
    patch.remove()
    assert changed == {id(m) for m in picked.values()}
    for name in base:
        assert (hooked[name] - base[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(merged[name], hooked[name], atol=1e-4, rtol=1e-4, msg=name)


def test_wrong_family_lora_is_one_line(xl, sd1_components, tmp_path, lora_file):
    unet, _vae, text_encoder = sd1_components
    sd1 = make_lora(tmp_path / "sd1_style.safetensors", unet, text_encoder)
    with pytest.raises(ModelError, match=r"sd1_style.safetensors is an SD1/SD2 LoRA .*this model is SDXL") as err:
        NetworkPatch(xl.unet, xl.text_encoder, [load_lora(sd1)], text_encoder_2=xl.text_encoder_2)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match=r"xl_lora.safetensors is an SDXL LoRA .*this model is SD1/SD2"):
        NetworkPatch(unet, text_encoder, [load_lora(lora_file)])


# ControlNet-LLLite


class KohyaLLLite(torch.nn.Module):
    """kohya's LLLiteModule (Linear targets, inference) as the reference: depth from the block index."""

    def __init__(self, name: str, target: torch.nn.Linear, cond: int, mlp: int) -> None:
        super().__init__()
        block, _, index = name.removeprefix("lllite_unet_").split("_")[:3]  # input_blocks_4 / middle_block_1
        depth = 3 if block == "middle" else (1 if int(index) <= 2 else 2 if int(index) <= 5 else 3)
        convs = [torch.nn.Conv2d(3, cond // 2, 4, 4)]
        convs += {1: [torch.nn.ReLU(), torch.nn.Conv2d(cond // 2, cond, 2, 2)],
                  2: [torch.nn.ReLU(), torch.nn.Conv2d(cond // 2, cond, 4, 4)],
                  3: [torch.nn.ReLU(), torch.nn.Conv2d(cond // 2, cond // 2, 4, 4), torch.nn.ReLU(),
                      torch.nn.Conv2d(cond // 2, cond, 2, 2)]}[depth]
        self.conditioning1 = torch.nn.Sequential(*convs)
        self.down = torch.nn.Sequential(torch.nn.Linear(target.in_features, mlp), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(torch.nn.Linear(mlp + cond, mlp), torch.nn.ReLU())
        self.up = torch.nn.Sequential(torch.nn.Linear(mlp, target.in_features))
        self.target, self.multiplier, self.cond_emb = [target], 1.0, None

    def set_cond_image(self, image: torch.Tensor) -> None:
        cx = self.conditioning1(image)
        n, c, h, w = cx.shape
        self.cond_emb = cx.view(n, c, h * w).permute(0, 2, 1)

    def apply_to(self) -> None:
        self.org_forward, self.target[0].forward = self.target[0].forward, self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cx = self.cond_emb
        if x.shape[0] // 2 == cx.shape[0]:
            cx = cx.repeat(2, 1, 1)
        cx = self.up(self.mid(torch.cat([cx, self.down(x)], dim=2))) * self.multiplier
        return self.org_forward(x + cx)


@pytest.fixture(scope="module")
def lllite_file(xl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lllite") / "canny_lllite.safetensors"
    save_file(lllite_state(xl.unet, cond_dim=8, mlp_dim=8), str(path))
    return path


def cond_image(batch: int = 2, size: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def cfg_unet(xl):
    """The UNet called on 4 rows: 2 images, uncond then cond (kohya's order: its repeat(2) fits)."""
    x, emb, added = unet_inputs(4, 8)
    return lambda: xl.unet(x, 500, emb, added_cond_kwargs=added).sample


@torch.no_grad()
def test_lllite_equals_kohyas_module(xl, lllite_file):
    lllite, call = load_lllite(lllite_file, "guidance.models[0]"), cfg_unet(xl)
    assert (lllite.mlp_dim, lllite.cond_dim, len(lllite.modules)) == (8, 8, 32)
    base, images, rows = call(), cond_image(), Rows.of_images(2).stacked(("uncond", "prompt"))
    patch = LLLitePatch(xl.unet, [lllite])
    maps = patch.embed([images])
    with patch.acting([0.0], maps, rows):
        assert torch.equal(call(), base)  # multiplier 0 is no LLLite, exactly
    with patch.acting([0.7], maps, rows):
        ours = call()
    assert torch.equal(call(), base)  # inert outside a call
    patch.restore()
    assert torch.equal(call(), base)

    state, names = load_file(str(lllite_file)), module_map(xl.unet, xl.text_encoder, xl.text_encoder_2)
    kohya = []
    for name in lllite.modules:
        module = KohyaLLLite(name, names[name.replace("lllite_unet_", "lora_unet_")], 8, 8)
        module.load_state_dict({k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")})
        module.multiplier = 0.7
        module.set_cond_image(images)
        module.apply_to()
        kohya.append(module)
    want = call()
    for module in kohya:
        del module.target[0].forward  # back to the class's forward
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(call(), base)


def test_lllite_ratio_switches_it_off(xl, lllite_file, tmp_path):
    guide = tmp_path / "guide.png"
    Image.new("RGB", (64, 64), (200, 30, 90)).save(guide)
    settings = LLLiteSettings((LLLiteUnit(str(lllite_file), Preprocess("none", "none"), 1.0, 0.5),))
    ctx = SimpleNamespace(engine=SimpleNamespace(placement=SimpleNamespace(device="cpu")),
                          jobs=(SimpleNamespace(guide_images=(str(guide),)),) * 2,
                          key=SimpleNamespace(width=64, height=64))
    images = lllite_feature.cond_images(ctx, settings)[0]
    assert images.shape == (2, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert torch.allclose(images[0, :, 0, 0], torch.tensor([200, 30, 90]) / 127.5 - 1)
    patch = LLLitePatch(xl.unet, [load_lllite(lllite_file, "k")])
    x, emb, added = unet_inputs(4, 8)
    rows = Rows.of_images(2).stacked(("uncond", "prompt"))
    inner = lambda x, t, cond: xl.unet(x, t, emb, added_cond_kwargs=added).sample  # noqa: E731
    model = with_lllite(patch, settings, patch.embed([images]))(inner)
    with torch.no_grad():
        base = inner(x, 500, None)
        out = [model(x, 500, Conditioning(embeddings=emb, rows=rows, step=s, steps=4)) for s in range(4)]
    patch.restore()
    assert [torch.equal(o, base) for o in out] == [False, False, False, True]  # 2/4 <= 0.5: still on


def test_lllite_map_follows_smaller_latents():
    cond_map = torch.arange(2 * 3 * 8 * 6, dtype=torch.float32).view(2, 3, 8, 6)
    assert torch.equal(lllite_feature._as_tokens(cond_map, 48), cond_map.flatten(2).transpose(1, 2))
    smaller = lllite_feature._as_tokens(cond_map, 12)  # Deep Shrink / Gradual Latent: a 4x3 grid
    want = torch.nn.functional.interpolate(cond_map, size=(4, 3), mode="bilinear", align_corners=False)
    assert torch.equal(smaller, want.flatten(2).transpose(1, 2))
    with pytest.raises(ModelError, match="sees 13 tokens"):
        lllite_feature._as_tokens(cond_map, 13)


def test_lllite_bad_files_are_one_line(xl, sd1_components, lllite_file, tmp_path):
    other = tiny_sdxl(seed=1)
    attention = other.unet.down_blocks[2].attentions[1]
    attention.transformer_blocks = attention.transformer_blocks[:1]  # one transformer where the file has two
    with pytest.raises(ModelError, match=r"guidance.models\[0\]: LLLite file .*canny_lllite.safetensors is for another "
                                         r"layout: lllite_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_k"):
        LLLitePatch(other.unet, [load_lllite(lllite_file, "guidance.models[0]")])
    cn = tmp_path / "cn.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}, str(cn))
    with pytest.raises(ModelError, match=r"cn.safetensors is a ControlNet, not a ControlNet-LLLite file .*"
                                         r"cannot be combined with ControlNet"):
        load_lllite(cn, "guidance.models[0]")
    run = SimpleNamespace(guidance=SimpleNamespace(name="lllite", models=[str(lllite_file)]))
    sd1 = SimpleNamespace(bundle=SimpleNamespace(unet=sd1_components[0], text_encoder=sd1_components[2]))
    with pytest.raises(ModelError, match="ControlNet-LLLite files are for SDXL .* this SD1/SD2 model"):
        lllite_feature.FEATURE.patch(sd1, run)


def test_lllite_keys_and_records(lllite_file, tmp_path):
    spec = SimpleNamespace(highres=SimpleNamespace(disable_controlnet=False))
    cfg = GuidanceConfig(name="lllite", models=[str(lllite_file)], guide_image=str(tmp_path), weights=[0.8],
                         ratios=[0.25])
    cfg.check(spec)
    settings = cfg.for_image(None, None)
    assert settings.units[0].weight == 0.8 and settings.units[0].ratio == 0.25
    for bad, message in ((dict(start=[0.1]), "guidance.start is a ControlNet key; .* cannot be combined with "
                                             "ControlNet"),
                         (dict(guess_mode=True), "guidance.guess_mode is a ControlNet key"),
                         (dict(ratios=[0.0]), r"guidance.ratios\[0\] must be in \(0, 1\]"),
                         (dict(models=[str(tmp_path / "gone.safetensors")]), r"guidance.models\[0\]: no such file"),
                         (dict(weights=[1, 2]), "guidance.weights has 2 value"),
                         (dict(guide_image=None), "guidance=lllite needs guidance.guide_image")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(cfg, **bad).check(spec)
    record = settings.record(SimpleNamespace(guide_images=("g.png",)))
    assert record["name"] == "lllite" and record["units"][0]["guide_image"] == "g.png"
    record["units"][0].update(name="canny_lllite", hash="0123456789")
    assert _controlnet_fields({"guidance": record}) == {
        "ControlNet 0": "Module: none, Model: canny_lllite [01234567], Weight: 0.8, Guidance Start: 0.0, "
                        "Guidance End: 0.25"}

