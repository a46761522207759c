"""`interactive=true` end to end: prompts from a pipe and from a terminal, saved paths printed, clean EOF."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_run import ROOT, SMALL, manifest


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "model=tiny", "interactive=true", "seed=10",
            f"hydra.run.dir={run_dir}", *SMALL]


def _env(cache: Path) -> dict:
    return {**os.environ, "SDBATCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def test_prompts_through_a_pipe(cache_dir, tmp_path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    proc = subprocess.run(_command(run_dir), input="a cat\n# a comment\na dog --w 48 --bad\na fox --w 48\n",
                          capture_output=True, text=True, env=_env(cache_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr
    paths = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert [p.name for p in paths] == ["00000-10.png", "00001-11.png"] and all(p.exists() for p in paths)
    assert "stdin:2: " in proc.stderr and "--bad" in proc.stderr, "a bad line is reported and skipped"
    assert [rec["prompt"] for rec in manifest(run_dir)] == ["a cat", "a fox"]
    assert "prompt> " not in proc.stderr


def test_prompts_through_a_terminal(cache_dir, tmp_path) -> None:  # noqa: F811
    master, slave = os.openpty()
    proc = subprocess.Popen(_command(tmp_path / "run"), stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(cache_dir))
    os.close(slave)
    os.write(master, b"a lighthouse\n")
    time.sleep(0.5)
    os.write(master, b"\x04")  # Ctrl-D: end of input on a terminal
    out, err = proc.communicate(timeout=300)
    os.close(master)
    assert proc.returncode == 0, err
    assert "prompt> " in err and out.strip().endswith("00000-10.png")
