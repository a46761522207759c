"""Model files found by name under one models folder (paths.models), in A1111's layout or sdbatch's own.

A1111 keeps one folder per kind (Stable-diffusion/, VAE/, Lora/, embeddings/, ControlNet/); sdbatch's layout
spells them checkpoints/, vae/, loras/, embeddings/, controlnet/. Both are read, each recursively, so an A1111
install is used as it is. A NAME matches a file by its stem ("realistic"), its path under the kind's folder
without extension ("sd15/realistic") or with it, or its file name ("realistic.safetensors"). A diffusers folder
(one holding model_index.json or config.json) is one entry, named like a file.

Our own code: the rules are A1111's naming and a directory walk; difflib proposes the closest names on a miss.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from sdbatch.errors import ConfigError

CLOSE_NAMES = 3  # closest names a miss proposes
_SHOWN_NAMES = 5  # names a miss lists when none is close


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of model file: where it lives, which files count, and what a diffusers folder of it holds."""

    label: str  # "checkpoint", "LoRA", ... (messages and listings)
    folders: tuple[str, ...]  # subfolders of paths.models, A1111's names first
    suffixes: tuple[str, ...]  # file extensions, preferred first when one name has several
    marker: str | None = None  # a folder holding this file is one model (a diffusers folder)


KINDS = {
    "checkpoint": Kind("checkpoint", ("Stable-diffusion", "checkpoints"), (".safetensors", ".ckpt"),
                       "model_index.json"),
    "vae": Kind("VAE", ("VAE", "vae"), (".safetensors", ".ckpt", ".pt", ".bin"), "config.json"),
    "lora": Kind("LoRA", ("Lora", "LyCORIS", "loras"), (".safetensors", ".pt", ".ckpt", ".bin")),
    "embedding": Kind("embedding", ("embeddings",), (".safetensors", ".pt", ".bin")),
    "controlnet": Kind("ControlNet", ("ControlNet", "controlnet"), (".safetensors", ".pth", ".pt", ".ckpt", ".bin"),
                       "config.json"),
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One model found: its name (path under the kind's folder, no extension) and its file or folder."""

    name: str  # "sd15/realistic"
    path: Path


def kind_folders(root: str | Path, kind: str) -> list[Path]:
    """The kind's folders that exist under `root` (A1111's and sdbatch's names; both when both exist), and for
    embeddings A1111's own place, `root/../embeddings`, when `root` is an A1111 models/ folder without one."""
    base = Path(root).expanduser()
    folders = [base / name for name in KINDS[kind].folders if (base / name).is_dir()]
    beside = base.parent / "embeddings"  # A1111 keeps embeddings beside its models/ folder, not in it
    if kind == "embedding" and not folders and (base / "Stable-diffusion").is_dir() and beside.is_dir():
        folders.append(beside)
    return folders


def scan(folders: list[Path], kind: str) -> list[Entry]:
    """Every model of `kind` under `folders`, recursively (symbolic links followed once), sorted by name."""
    entries: list[Entry] = []
    for folder in folders:
        entries += _walk(folder, KINDS[kind])
    return sorted(entries, key=lambda e: (e.name.lower(), e.name, str(e.path)))


def _walk(folder: Path, kind: Kind) -> list[Entry]:
    found, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree: walked already
            dirs.clear()
            continue
        seen.add(real)
        for name in sorted(dirs):
            if kind.marker and (Path(here) / name / kind.marker).is_file():
                found.append(_entry(folder, Path(here) / name, ""))
        # a diffusers folder is one model: its weight files are not models of their own
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and not (
            kind.marker and (Path(here) / d / kind.marker).is_file())]
        for name in files:
            suffix = Path(name).suffix.lower()
            if suffix in kind.suffixes and not name.startswith("."):
                found.append(_entry(folder, Path(here) / name, suffix))
    return found


def _entry(folder: Path, path: Path, suffix: str) -> Entry:
    relative = path.relative_to(folder).as_posix()
    return Entry(relative[: len(relative) - len(suffix)] if suffix else relative, path)


def find(name: str, entries: list[Entry], kind: str) -> Entry | None:
    """The entry `name` means, None when none matches; ConfigError when files in different places match.

    An exact match wins over one that differs only in case; one name with several extensions in one folder
    means the preferred extension (`Kind.suffixes`: .safetensors first)."""
    wanted = name.strip().replace("\\", "/")
    for same in (str.__eq__, _same_case_folded):
        matches = [e for e in entries if any(same(wanted, form) for form in _forms(e))]
        if matches:
            return _one(wanted, matches, kind)
    return None


def _same_case_folded(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def _forms(entry: Entry) -> tuple[str, ...]:
    """What a user may write for an entry: its name, its stem, its file name, its path with extension."""
    file_name = entry.path.name
    with_suffix = entry.name if entry.name.endswith(file_name) else f"{entry.name}{entry.path.suffix}"
    return entry.name, entry.name.rsplit("/", 1)[-1], file_name, with_suffix


def _one(wanted: str, matches: list[Entry], kind: str) -> Entry:
    places = {e.name for e in matches}
    if len(places) > 1:
        raise ConfigError(f"{KINDS[kind].label} name {wanted!r} matches {len(places)} files: "
                          f"{', '.join(sorted(places))}; write the path under the folder to choose one")
    order = KINDS[kind].suffixes
    return min(matches, key=lambda e: order.index(e.path.suffix.lower()) if e.path.suffix.lower() in order else -1)


def suggest(name: str, entries: list[Entry], kind: str) -> str:
    """What to say after a name matched nothing: the closest names there are, or some of them, or that none is."""
    if not entries:
        return f"there are no {KINDS[kind].label} files"
    # one form per file, the one written: its path under the folder when `name` has one, else its stem
    names = sorted({e.name if "/" in name else e.name.rsplit("/", 1)[-1] for e in entries})
    close = difflib.get_close_matches(name, names, n=CLOSE_NAMES, cutoff=0.4)
    if close:
        return f"closest: {', '.join(close)}"
    some = ", ".join(sorted({e.name for e in entries})[:_SHOWN_NAMES])
    more = f" and {len(entries) - _SHOWN_NAMES} more" if len(entries) > _SHOWN_NAMES else ""
    return f"there are {some}{more}"


def describe(root: str | Path, kind: str) -> str:
    """Where `kind` is looked for under `root`, for messages: "/m/Lora, /m/loras" or the folder names tried."""
    folders = kind_folders(root, kind)
    if folders:
        return ", ".join(str(f) for f in folders)
    names = " or ".join(f"{n}/" for n in KINDS[kind].folders)
    return f"paths.models={root} (no {names} folder there)"
