"""Prompt files end to end: per-line options, dynamic prompts, seeds, batching invariance and errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import pixels, spec
from PIL import Image

from sdbatch.cli.runner import run
from sdbatch.errors import PromptError
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine, read_prompts

torch.set_num_threads(1)

MIXED = """# a mixed prompt file
a red cube --w 64 --h 64
a blue ball --w 48 --h 64 --l 4
a green cone --s 3 --n blurry, dark
a {tiny|huge} house --l 9 --w 48 --h 64
a yellow star --d 77,78
an orange moon --w 64 --h 48 --s 3
a purple tree
a white cloud --w 48 --h 64
a black cat --l 2.5 --s 3
a grey dog --w 64 --h 48
a pink flower --n ugly
a brown bear --w 48 --h 64 --s 3
"""


def _manifest(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]


def _run_file(tmp_path: Path, checkpoint: Path, text: str, name: str, **changes) -> Path:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(text, encoding="utf-8")
    run_spec = spec(checkpoint, prompt=None, prompt_file=str(prompt_file), steps=2, seed=5, **changes)
    return run(run_spec, tmp_path / name).run_dir


def test_options_change_what_they_should(sd1_single_file, tmp_path) -> None:
    lines = {rec["origin"]: rec for rec in _manifest(_run_file(tmp_path, sd1_single_file, MIXED, "r"))}
    assert (lines["prompts.txt:3"]["width"], lines["prompts.txt:3"]["cfg_scale"]) == (48, 4.0)
    assert lines["prompts.txt:4"]["steps"] == 3 and lines["prompts.txt:4"]["negative_prompt"] == "blurry, dark"
    assert lines["prompts.txt:5"]["prompt"] in ("a tiny house", "a huge house")
    assert lines["prompts.txt:5"]["raw_prompt"] == "a {tiny|huge} house --l 9 --w 48 --h 64"
    assert lines["prompts.txt:6"]["seed"] == 77
    assert lines["prompts.txt:8"]["steps"] == 2 and lines["prompts.txt:8"]["width"] == 64
    image = pixels(tmp_path / "r" / lines["prompts.txt:3"]["file"])
    assert image.shape == (64, 48, 3)


def test_batch_size_and_order_change_no_file(sd1_single_file, tmp_path) -> None:
    one = _run_file(tmp_path, sd1_single_file, MIXED, "b1", batch_size=1)
    four = _run_file(tmp_path, sd1_single_file, MIXED, "b4", batch_size=4)
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in four.glob("*.png")) and len(names) == 12
    for name in names:
        a, b = pixels(one / name).astype(int), pixels(four / name).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, name


def test_malformed_line_names_file_and_line(sd1_single_file, tmp_path) -> None:
    with pytest.raises(PromptError, match=r"prompts.txt:2: .*--w"):
        _run_file(tmp_path, sd1_single_file, "ok\nbad --w abc\n", "e")


def test_on_error_skip_drops_the_line_and_goes_on(sd1_single_file, tmp_path, caplog) -> None:
    run_dir = _run_file(tmp_path, sd1_single_file, "ok\nbad --d 1,\nfine\n", "s", on_error="skip")
    assert [rec["origin"] for rec in _manifest(run_dir)] == ["prompts.txt:1", "prompts.txt:3"]
    assert "prompts.txt:2" in caplog.text


def _plan(text: str, **changes):
    run_spec = dataclasses.replace(spec("unused.safetensors"), **changes)
    return plan(run_spec, read_prompts(text, "", None), base_seed=100)


def test_explicit_seeds_then_derived_with_a_warning(caplog) -> None:
    jobs = _plan("x --d 1,2", images_per_prompt=3)
    assert [j.seed for j in jobs] == [1, 2, 102]
    assert "more images than --d seeds" in caplog.text


def test_iter_same_seed_and_shuffle_are_reproducible() -> None:
    jobs = _plan("x", images_per_prompt=2, n_iter=3, iter_same_seed=True)
    assert [j.seed for j in jobs] == [100, 100, 101, 101, 102, 102]
    lines = [PromptLine(f"p{i}", "", f"prompt[{i}]") for i in range(8)]
    run_spec = dataclasses.replace(spec("unused.safetensors"), shuffle_prompts=True)
    first, again = plan(run_spec, lines, 7), plan(run_spec, lines, 7)
    assert [j.prompt for j in first] == [j.prompt for j in again] != [f"p{i}" for i in range(8)]


def test_enumeration_makes_one_prompt_per_combination() -> None:
    jobs = _plan("{e$$red|blue} {e$$cube|ball}")
    assert sorted(j.prompt for j in jobs) == ["blue ball", "blue cube", "red ball", "red cube"]
    assert len({j.seed for j in jobs}) == 4


def test_file_name_option_stays_unique() -> None:
    jobs = _plan("x --f cat.png", images_per_prompt=2, n_iter=2)
    assert [j.file_name for j in jobs] == ["cat.png", "cat-1.png", "cat-2.png", "cat-3.png"]


def test_prompt_module_lines_are_generated(sd1_single_file, tmp_path) -> None:
    module = tmp_path / "prompter.py"
    module.write_text(
        "def get_prompter(spec, engine):\n"
        "    assert engine.bundle.tokenizer.encode('cat')\n"
        "    yield f'a cat --w {spec.width // 2}'\n"
        "    yield {'prompt': 'a dog', 'negative_prompt': 'blurry'}\n",
        encoding="utf-8",
    )
    run_spec = spec(sd1_single_file, prompt=None, prompt_module=str(module), steps=2, seed=1)
    records = _manifest(run(run_spec, tmp_path / "m").run_dir)
    assert [(r["prompt"], r["width"], r["negative_prompt"]) for r in records] == [("a cat", 32, ""),
                                                                                 ("a dog", 64, "blurry")]
    assert records[0]["origin"] == "prompter.py:#1"


def test_recorded_options_reach_the_manifest(sd1_single_file, tmp_path) -> None:
    line = ("a (red:1.3) cube --t 0.5 --nl 2 --am 0.5,1 --c a clip prompt --f cube --dsd1 1 --dst1 600 --dsr 0.5 "
            "--glt 700 --glr 0.6 --gle 2 --gls 0.1 --glsn 1.0 --glus 3,0.5,0.5,0")
    (record,) = _manifest(_run_file(tmp_path, sd1_single_file, line + "\n", "o", sampler="euler_a"))
    assert record["file"] == "cube.png" and (tmp_path / "o" / "cube.png").exists()
    assert record["prompt"] == "a (red:1.3) cube" and record["raw_prompt"] == line
    # --am without networks is ignored with a warning (test_networks_run covers it with networks)
    assert (record["strength"], record["negative_scale"], record["network_muls"]) == (0.5, 2.0, None)
    assert record["clip_prompt"] == "a clip prompt"
    assert record["deep_shrink"]["depth_1"] == 1 and record["deep_shrink"]["ratio"] == 0.5
    assert record["gradual_latent"]["timesteps"] == 700 and record["gradual_latent"]["s_noise"] == 1.0


def test_wildcards_dir_feeds_the_prompts(sd1_single_file, tmp_path) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "color.txt").write_text("crimson\nteal\n", encoding="utf-8")
    from sdbatch.config.spec import PromptsConfig

    run_dir = _run_file(tmp_path, sd1_single_file, "a __color__ car\n", "w", images_per_prompt=6,
                        prompts=PromptsConfig(wildcards_dir=str(cards)))
    prompts = [r["prompt"] for r in _manifest(run_dir)]
    assert set(prompts) <= {"a crimson car", "a teal car"} and len(set(prompts)) == 2


def test_done_when_one_file_mixes_everything(sd1_single_file, sd1_components, tmp_path) -> None:
    """Weights, a long prompt, a TI embedding, wildcards and per-line options in one prompt file and run."""
    from safetensors.torch import save_file

    from sdbatch.config.spec import ModelConfig, PromptsConfig

    width = sd1_components[2].config.hidden_size
    embedding = tmp_path / "shinystyle.safetensors"
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))}, str(embedding))
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "animal.txt").write_text("fox\nowl\n", encoding="utf-8")
    long_line = ", ".join(f"detail{i}" for i in range(60)) + " --s 3"
    text = ("a (red:1.3) __animal__ in [fog] --w 48 --h 64\n"
            f"{long_line}\n"
            "a shinystyle castle --n (blurry:1.2), shinystyle --l 4 --d 99\n")
    model = ModelConfig(checkpoint=str(sd1_single_file), v2="false", v_parameterization="false", precision="fp32",
                        textual_inversion=[str(embedding)])
    run_dir = _run_file(tmp_path, sd1_single_file, text, "all", model=model, max_embeddings_multiples=3,
                        prompts=PromptsConfig(wildcards_dir=str(cards)))
    first, long, castle = sorted(_manifest(run_dir), key=lambda rec: rec["index"])
    assert first["prompt"] in ("a (red:1.3) fox in [fog]", "a (red:1.3) owl in [fog]") and first["width"] == 48
    assert long["steps"] == 3 and long["prompt"].endswith("detail59")
    assert castle["seed"] == 99 and castle["cfg_scale"] == 4.0
    assert [e["name"] for e in castle["textual_inversion"]] == ["shinystyle"] and first["textual_inversion"] == []
    info = Image.open(run_dir / castle["file"]).text["parameters"]
    assert 'TI hashes: "shinystyle: ' in info and "Negative prompt: (blurry:1.2), shinystyle" in info
