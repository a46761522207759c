"""A first run that just works: model=tiny's demo-sized defaults, an empty prompt is one line, and a run that
fails before generating leaves no folder of logs behind."""

from __future__ import annotations

from test_configs import _compose
from test_run import manifest, run_cli

from sdbatch.config.resolve import resolve


def compose_spec(*overrides: str):
    return resolve(_compose(*overrides))


def test_tiny_model_brings_demo_defaults_and_explicit_values_win() -> None:
    spec = compose_spec("model=tiny", "prompt=x")
    assert (spec.model.default_size, spec.sampler.steps) == (128, 12)
    spec = compose_spec("model=tiny", "prompt=x", "sampler.steps=30", "width=256")
    assert (spec.sampler.steps, spec.width) == (30, 256)
    assert compose_spec("model=sd15", "model.checkpoint=/m/x.safetensors", "prompt=x").sampler.steps == 50


def test_the_first_command_makes_a_128px_image_at_12_steps(cache_dir, tmp_path) -> None:
    proc = run_cli(["model=tiny", "prompt=a cat", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    [line] = manifest(tmp_path / "run")
    assert (line["width"], line["height"], line["steps"]) == (128, 128, 12)


def test_an_empty_prompt_is_one_line_and_leaves_no_output_folder(cache_dir, tmp_path) -> None:
    for prompt in ("prompt=", "prompt=['  ']"):
        proc = run_cli(["model=tiny", prompt], cache_dir, tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("sdbatch:")]
        assert proc.returncode == 2 and len(errors) == 1 and "is empty" in errors[0], proc.stderr
    assert not (tmp_path / "outputs").exists()  # Hydra's outputs/DATE/TIME with only its logs is gone
    kept = tmp_path / "kept"
    (kept / "old.png").parent.mkdir()
    (kept / "old.png").write_bytes(b"x")
    proc = run_cli(["model=tiny", "prompt=", f"hydra.run.dir={kept}"], cache_dir, tmp_path)
    assert proc.returncode == 2 and (kept / "old.png").exists()  # a folder with anything else stays
