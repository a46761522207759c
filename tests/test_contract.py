"""The row contract and the feature contract: who each UNet row is, and how the engine finds and orders features."""

from __future__ import annotations

import pytest
import torch

from sdbatch.engine.core.contract import Feature, all_features
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.core.rows import NEGATIVE, PROMPT, UNCOND, Rows, calling, current, row_factor
from sdbatch.engine.core.session import Session
from sdbatch.engine.features.cfg import with_cfg

torch.set_num_threads(1)


def test_rows_stack_per_cfg_part_and_gather_per_image_data() -> None:
    rows = Rows.of_images(3).with_image_data(muls=torch.tensor([[0.0], [0.5], [1.0]]))
    stacked = rows.stacked([NEGATIVE, PROMPT, UNCOND])
    assert stacked.image == (0, 1, 2) * 3 and stacked.images == 3 and len(stacked) == 9
    assert stacked.part == (NEGATIVE,) * 3 + (PROMPT,) * 3 + (UNCOND,) * 3
    assert stacked.per_row("muls")[:, 0].tolist() == [0.0, 0.5, 1.0] * 3
    assert stacked.per_row("missing") is None
    out = torch.ones(9, 4, 2, 2)
    assert (out * row_factor(stacked.per_row("muls")[:, 0], out))[:, 0, 0, 0].tolist() == [0.0, 0.5, 1.0] * 3
    with pytest.raises(ValueError, match="9 rows"):
        row_factor(torch.ones(6), out)


def test_a_regional_layout_gathers_by_image_without_changing_the_others() -> None:
    """Regions (later) repeat each image's rows; data is still found by image, whatever the order."""
    base = Rows.of_images(2).with_image_data(hint=torch.tensor([10.0, 20.0]))
    regional = Rows(image=(0, 0, 1, 1), part=(PROMPT,) * 4, region=(0, 1, 0, 1), per_image=base.per_image)
    assert regional.stacked([NEGATIVE, PROMPT]).per_row("hint").tolist() == [10.0, 10.0, 20.0, 20.0] * 2


def test_calling_publishes_the_rows_of_the_call_and_restores_the_outer_ones() -> None:
    outer, inner = Rows.of_images(1), Rows.of_images(2)
    assert current() is None
    with calling(outer):
        with pytest.raises(RuntimeError), calling(inner):
            assert current() is inner
            raise RuntimeError
        assert current() is outer
    assert current() is None


def test_cfg_stacks_the_rows_its_inner_call_sees() -> None:
    seen = []

    def inner(x, t, cond):
        seen.append(cond.rows)
        return x

    cond = Conditioning(embeddings=torch.zeros(2, 1, 1), negative=torch.zeros(2, 1, 1),
                        cfg_scales=torch.tensor([7.0, 1.0]), rows=Rows.of_images(2).with_call_data(xti_tokens=77))
    with_cfg(inner)(torch.zeros(2, 4, 1, 1), torch.tensor(1), cond)
    assert seen[0].part == (NEGATIVE, NEGATIVE, PROMPT, PROMPT) and seen[0].per_call["xti_tokens"] == 77


def test_every_feature_module_is_found_in_order() -> None:
    features = all_features()
    names = [f.name for f in features]
    assert set(names) == {"txt2img", "img2img", "inpaint", "highres", "cfg", "deep_shrink", "gradual_latent",
                          "lora", "xti", "guidance", "guidance_hints", "attention_couple", "guided", "lllite",
                          "clip_vision", "token_merging", "deepcache"}
    assert all(isinstance(f, Feature) for f in features) and len(set(names)) == len(names)
    order = {f.name: f.order for f in features}
    # UNet wrappers: DeepCache innermost (it decides how the UNet runs), then Deep Shrink, then the 9-channel
    # inpainting input, CFG outside them (guided sampling alone sits outside CFG)
    assert order["deepcache"] < order["deep_shrink"] < order["inpaint"] < order["cfg"]
    # ControlNet sees the 4-channel latents and the CFG rows; its saved hints are the final (post-Highres.) size
    assert order["inpaint"] < order["guidance"] < order["cfg"] and order["highres"] < order["guidance_hints"]
    # guided sampling moves the CFG-guided prediction of the image rows: outside CFG
    assert order["cfg"] < order["guided"]
    # Attention Couple's parts are encoded inside LoRA's per-multiplier encode; its attention sits inside CFG
    assert order["attention_couple"] < order["lora"] and order["attention_couple"] < order["cfg"]
    # CLIP-Vision replaces the pooled embedding of the conditioning LoRA assembles
    assert order["lora"] < order["clip_vision"]
    # start steps: the providers before Gradual Latent's reduced start; encode: XTI inside LoRA
    assert max(order["txt2img"], order["img2img"], order["inpaint"]) < order["gradual_latent"]
    assert order["xti"] < order["lora"]


def test_one_session_per_model_at_a_time() -> None:
    class Undo:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def restore(self):
            self.log.append(self.name)

    model, log = object(), []
    first = Session(model, run=None)
    with pytest.raises(RuntimeError, match="already open"):
        Session(model, run=None)
    first.add("a", Undo(log, "a"))
    first.add("b", Undo(log, "b"))
    first.close()
    assert log == ["b", "a"], "patches are undone last first"
    Session(model, run=None).close()  # closed: the model is free again
