"""Every command in README.md runs as typed in bash.

The commands come from the README's ```bash blocks (backslash continuations joined) and from inline code spans
that start with `python run.py`, `sdbatch`, `sdbatch-gen-img`, `sdbatch-info` or `sdbatch-gallery`. They run
through `bash -c` in scratch directories, each block's lines in order (see `outcomes`), and must exit 0. What the
test changes, and only that:
- a named checkpoint (`model.checkpoint=FILE`, a `--ckpt FILE`) is a tiny model of the same family; the named
  LoRA and image files exist as tiny stand-ins;
- sizes are an eighth (at least 64), steps at most 4 (a benchmark: one timed round), `range(0,N)` seeds two,
  `--jobs N` twelve (the soak's least), Deep Shrink depths 1 (a tiny UNet has two down blocks); a size or step
  count left to the model is 64 and 4 (`model.default_size`/`default_steps`), except in the quick start's command;
- HOME is the scratch folder's `home/`, where `~/stable-diffusion-webui/models` holds the model names used;
- a block is one shell session (an `export` holds for its later lines); `bash .ci/setup[ test] && ` prefixes
  are dropped (CI has set up), and the test command itself is not run here.
A command holding `...`, `…` or a placeholder in capitals (FILE, NAME, ...) is a fragment (the README says so) and
is skipped.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from sdbatch.engine.models.export import save_single_file
from sdbatch.engine.models.tiny import build_tiny_components

ROOT = Path(__file__).resolve().parents[1]

_STARTS = re.compile(r"^(python3? (run\.py|-c|bench/)|sdbatch(-gen-img|-info|-gallery)? |mkdir |printf |echo |cat )")
_NOT_HERE = re.compile(r"^python3? -m pytest\b")  # the test command: CI runs it, not this test
_BARE = re.compile(r"^(python3? run\.py|sdbatch[-\w]*)$")  # a program named in prose, not a command
# '...' or '…' for the rest of a command line, or a placeholder in capitals for the user's own value
_FRAGMENT = re.compile(r"\.\.\.|…|\b(GROUP|OPTION|NAME|FILES?|DIR|KEY|VALUE|PATH)\b(?!\.txt)")


def readme_groups(text: str) -> list[list[str]]:
    """The README's commands in groups that run in order: each ```bash block's lines (continuations joined,
    comments dropped, its `export`s held for the lines after them), then each inline span on its own."""
    groups, seen = [], set()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined, exports, group = re.sub(r"\s*\\\n\s*", " ", block), "", []
        for line in (line.strip() for line in joined.splitlines()):
            if line and not line.startswith("#"):
                group.append(exports + line)
                exports += f"{line}; " if line.startswith("export ") else ""
        groups.append(group)
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    groups += [[span] for span in re.findall(r"`([^`\n]+)`", outside)
               if _STARTS.match(re.sub(r"^nice -n \d+ ", "", span))]
    unique = [[c for c in group if c not in seen and not seen.add(c)] for group in groups]
    return [group for group in unique if group]


def readme_commands(text: str) -> list[str]:
    """Every command of `readme_groups`, in README order."""
    return [command for group in readme_groups(text) for command in group]


def runnable(command: str) -> str | None:
    """The command as this test runs it (see the module docstring), or None for a fragment or the test command."""
    exports, command = re.match(r"(export [^;]*; )*", command)[0], re.sub(r"^(export [^;]*; )*", "", command)
    quick_start, command = command.startswith("bash .ci/setup"), re.sub(r"^bash \.ci/setup( test)? && ", "", command)
    nice, command = re.match(r"(nice -n \d+ )?", command)[0], re.sub(r"^nice -n \d+ ", "", command)
    if command.startswith("export "):
        return exports + command
    if _FRAGMENT.search(command) or _NOT_HERE.match(command) or _BARE.match(command) or not _STARTS.match(command):
        return None
    command = re.sub(r"\s+#[^'\"]*$", "", command)  # a trailing comment
    family = "sd2" if re.search(r"\bmodel=sd21", command) else "sd1"
    if not quick_start and re.match(r"(python3? run\.py|sdbatch) ", command):
        command += " model.default_size=64 model.default_steps=4"  # the quick start shows the real defaults' speed
    command = re.sub(r"(model\.checkpoint=|--ckpt )\S+\.(safetensors|ckpt|pth?)\b",
                     lambda m: f"{m[1]}tiny-{family}.safetensors", command)  # a file; a name is looked up
    command = re.sub(r"\b(width|height|--W|--H)([= ])(\d+)", lambda m: f"{m[1]}{m[2]}{_small(int(m[3]))}", command)
    command = re.sub(r"\b(sampler\.steps|highres\.steps|--steps)([= ])(\d+)",
                     lambda m: f"{m[1]}{m[2]}{min(int(m[3]), 4)}", command)
    command = re.sub(r"range\(0,\s*\d+\)", "range(0,2)", command)
    command = re.sub(r"--jobs \d+", "--jobs 12", command)
    if re.match(r"python3? bench/(controlnet|regional|guided)\.py", command):
        command += " --steps 4 --repeats 1"  # steps at most 4, as everywhere; one timed round
    command = re.sub(r"\b(deep_shrink\.depth_[12]=|--dsd[12] )\d+", r"\g<1>1", command)  # tiny UNets: 2 blocks
    command = re.sub(r"^python3? (run\.py|bench/)", lambda m: f"{sys.executable} {ROOT}/{m[1]}", command)
    return exports + nice + re.sub(r"^python3? ", f"{sys.executable} ", command)


def _small(pixels: int) -> int:
    return max(64, pixels // 8 // 8 * 8)


COMMANDS = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))


def _scratch(where: Path, cache_dir: Path) -> Path:
    """A working directory holding every file the README's commands name."""
    for family in ("sd1", "sd2"):
        save_single_file(where / f"tiny-{family}.safetensors", *build_tiny_components(family, 0), family)
    env = {**os.environ, "SDBATCH_CACHE": str(cache_dir)}
    lora = subprocess.run([sys.executable, "-c", "from sdbatch.engine.models.tiny_lora import ensure_tiny_lora as e;"
                           "print(e())"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    for name in ("style", "a", "b", "style-loha", "loras/style"):
        (where / name).parent.mkdir(exist_ok=True)
        shutil.copy(lora, where / f"{name}.safetensors")
    _images(where)
    _guide_models(where)
    (where / "prompts.txt").write_text("a red cube\n# a comment\na blue ball --n blurry\n", encoding="utf-8")
    (where / "scenes.txt").write_text("a knight AND a castle\na ship AND a storm AND a lighthouse\n",
                                      encoding="utf-8")
    first = where / "outputs/2026-11-26/21-14-45"
    subprocess.run([sys.executable, str(ROOT / "run.py"), "model=tiny", "prompt=a cat", "width=64", "height=64",
                    "sampler.steps=2", "seed=3148175114", f"hydra.run.dir={first}"], cwd=where, env=env, check=True,
                   capture_output=True)
    assert (first / "00000-3148175114.png").is_file()
    _downloads(where / "downloads")
    _webui_models(where / "home/stable-diffusion-webui/models", where / "tiny-sd1.safetensors", lora)
    shutil.copytree(first, where / "outputs/2025-01-01/12-00-00")
    shutil.copy(first / "00000-3148175114.png", where / "outputs/2025-01-01/12-00-00/00000-42.png")
    return where


def _webui_models(root: Path, checkpoint: Path, lora: str) -> None:
    """An A1111 models folder (HOME is the scratch folder's home/) holding the names the README uses."""
    from sdbatch.engine.models.export import vae_to_ldm

    unet, vae, text_encoder = build_tiny_components("sd1", 0)
    for folder in ("Stable-diffusion/sd15", "VAE", "Lora", "embeddings"):
        (root / folder).mkdir(parents=True)
    for name in ("v1-5-pruned-emaonly", "sd15/realistic"):
        shutil.copy(checkpoint, root / f"Stable-diffusion/{name}.safetensors")
    safetensors.torch.save_file(vae_to_ldm(vae), str(root / "VAE/vae-ft-mse-840000-ema-pruned.safetensors"))
    for name in ("ink", "watercolor"):
        shutil.copy(lora, root / f"Lora/{name}.safetensors")
    vectors = torch.randn(2, text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embedding = {"emb_params": vectors}
    safetensors.torch.save_file(embedding, str(root / "embeddings/EasyNegative.safetensors"))


def _guide_models(where: Path) -> None:
    """Guided sampling's models under the README's names: a tiny random CLIP folder and VGG16 state dict."""
    from guided_files import write_clip, write_vgg16

    shutil.copytree(write_clip(where / "guide-models")[0], where / "CLIP-ViT-B-32-laion2B")
    write_vgg16(where / "vgg16-397923af.pth")
    Image.new("RGB", (64, 64), "orange").save(where / "style.png")


def _downloads(folder: Path) -> None:
    """Other tools' images: an A1111 JPEG (EXIF UserComment) and a ComfyUI PNG (graph JSON)."""
    from test_image_formats import a1111_jpeg, comfyui_graphs, comfyui_png

    folder.mkdir()
    a1111_jpeg(folder / "a1111.jpg", "a lighthouse\nNegative prompt: fog\nSteps: 3, Seed: 5, Size: 64x64")
    comfyui_png(folder / "comfyui.png", *comfyui_graphs("a bottle, purple galaxy", "text, watermark"))


def _images(where: Path) -> None:
    """Init images, inpainting masks, ControlNet guides and region masks (colour by part)."""
    for folder in ("inputs", "photos", "masks", "pairs"):
        (where / folder).mkdir()
    for i, colour in enumerate(("red", "navy")):
        Image.new("RGB", (96, 64), colour).save(where / f"inputs/{i + 1}.png")
        Image.new("RGB", (64, 64), colour).save(where / f"photos/{i}.png")
        Image.new("RGB", (128, 128), colour).save(where / f"pairs/{i}.png")
    Image.new("RGB", (80, 64), "teal").save(where / "photo.png")
    regions = Image.new("RGB", (64, 64), (255, 0, 0))
    regions.paste((0, 255, 0), (32, 0, 64, 32))
    regions.paste((0, 0, 255), (0, 32, 64, 64))
    regions.save(where / "mask.png")
    for i in range(2):
        regions.save(where / f"masks/{i}.png")


def _run(command: str, where: Path, cache_dir: Path) -> subprocess.CompletedProcess | None:
    """The command through bash in `where` (None when it is not run, see `runnable`)."""
    shell = runnable(command)
    if shell is None:
        return None
    return subprocess.run(["bash", "-c", shell], cwd=where, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SDBATCH_CACHE": str(cache_dir), "HOME": str(where / "home")})


def _run_groups(groups: list[list[str]], where: Path, cache_dir: Path) -> dict[str, object]:
    return {command: _run(command, where, cache_dir) for group in groups for command in group}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, cache_dir) -> dict[str, object]:
    """Every command's outcome. Groups that create files other groups read (`mkdir ...`) run first; the rest run
    in two scratch folders at once, a group's commands in order (two folders, so two runs starting in one second
    never share a run directory)."""
    first = _scratch(tmp_path_factory.mktemp("readme"), cache_dir)
    groups = readme_groups((ROOT / "README.md").read_text(encoding="utf-8"))
    setup = [group for group in groups if any(c.startswith("mkdir ") for c in group)]
    outcomes = _run_groups(setup, first, cache_dir)
    second = tmp_path_factory.mktemp("readme") / "scratch"
    shutil.copytree(first, second, symlinks=True)
    rest = [group for group in groups if group not in setup]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for done in pool.map(_run_groups, (rest[0::2], rest[1::2]), (first, second), (cache_dir, cache_dir)):
            outcomes.update(done)
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c[:80] for c in COMMANDS])
def test_readme_command_runs_as_typed(command: str, outcomes: dict[str, object]) -> None:
    done = outcomes[command]
    if done is None:
        pytest.skip("a fragment ('...') or the test command itself")
    assert done.returncode == 0, f"{command}\n-> {runnable(command)}\n{done.stderr[-3000:]}"


def test_commands_are_found_and_substituted() -> None:
    """The extraction itself: continuation lines join, fragments skip, named files become tiny stand-ins."""
    text = "```bash\n# c\npython run.py a=1 \\\n    b=2\npython run.py ... x\n```\nsee `python run.py c=3`.\n"
    assert readme_commands(text) == ["python run.py a=1 b=2", "python run.py ... x", "python run.py c=3"]
    assert runnable("python run.py ... x") is None and runnable("python3 -m pytest") is None
    shell = runnable("python run.py model=sd21 model.checkpoint=/m/v2.safetensors width=768 sampler.steps=30")
    assert shell.endswith("model=sd21 model.checkpoint=tiny-sd2.safetensors width=96 sampler.steps=4 "
                          "model.default_size=64 model.default_steps=4")
    assert len(COMMANDS) > 30, "the README's commands are found"
