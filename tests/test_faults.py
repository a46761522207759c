"""Faults where the user meets them: SIGINT/SIGTERM mid-run, unwritable and full disks, damaged images on
resume, two processes in one run directory, the hash cache under a lock, and the one atomic-write helper.

Command-line tests assert the exit status, exactly one `sdbatch:` line and no traceback. Faults that need
privileges (a read-only mount, a tiny full file system) run in a private mount namespace (`unshare -rm`)
where the machine allows it; the same faults are also simulated by tests/fault_hooks.py, which patches the
write path of a `python run.py` subprocess (no hooks live in the product).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image

from sdbatch.errors import OutputError
from sdbatch.outputs import files
from sdbatch.outputs.files import Interrupted, atomic_write_text, deferred_interrupts
from sdbatch.outputs.metadata import image_params
from sdbatch.outputs.run_dir import RunDir, intact_image
from sdbatch.plan.jobs import ImageJob, ModelInfo

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "fault_hooks.py"
SMALL = ["model=tiny", "prompt=a cat", "width=64", "height=64", "perf.progress=false"]
SLOW = [*SMALL, "sampler.steps=40"]  # each image takes long enough for a signal to land mid-run


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SDBATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _command(args: list[str], fault: str | None = None) -> list[str]:
    if fault:
        return [sys.executable, str(HOOKS), str(ROOT / "run.py"), *args]
    return [sys.executable, str(ROOT / "run.py"), *args]


def run_cli(args: list[str], cache: Path, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = _env(cache, **({"SDBATCH_FAULT": fault} if fault else {}))
    return subprocess.run(_command(args, fault), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def sdbatch_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sdbatch:")]


def one_line(proc: subprocess.CompletedProcess, status: int) -> str:
    """The single `sdbatch:` line of a command that must exit with `status` without a traceback."""
    lines = sdbatch_lines(proc.stderr)
    assert proc.returncode == status and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
    return lines[0]


def manifest_files(run_dir: Path) -> list[str]:
    return [json.loads(line)["file"] for line in (run_dir / "manifest.jsonl").read_text().splitlines()]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def assert_complete(run_dir: Path, count: int) -> None:
    """`count` images, each once in the manifest and on disk, every one a whole PNG."""
    files_listed = manifest_files(run_dir)
    assert len(files_listed) == len(set(files_listed)) == count, files_listed
    assert sorted(p.name for p in run_dir.glob("*.png") if not p.name.startswith("grid")) == sorted(files_listed)
    for name in files_listed:
        with Image.open(run_dir / name) as image:
            image.load()


def _wait_for_png(proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 180
    while not list(folder.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal could be sent"


def _interrupt_after_first_png(args: list[str], cache: Path, cwd: Path, folder: Path,
                               sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(_command(args), cwd=cwd, env=_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_png(proc, folder)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null"
                            " || mount -t tmpfs -o size=64k tmpfs \"$0\"", "/tmp"], capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="no private mount namespace here (unshare -rm); "
                                   "the patched-write tests cover the same faults")


def run_in_namespace(setup: str, args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`setup` (mount commands) then `python run.py args` in a private user and mount namespace."""
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in _command(args))
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{setup} && exec {quoted}"], cwd=cwd, env=_env(cache),
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow  # end-to-end in subprocesses: the slow stage of .ci/run
def test_signal_mid_run_prints_one_line_then_the_rerun_resumes(sig, status, cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [*SLOW, "images_per_prompt=4", f"hydra.run.dir={run_dir}"]
    proc = _interrupt_after_first_png(args, cache_dir, tmp_path, run_dir, sig)
    line = one_line(proc, status)
    found = re.fullmatch(r"sdbatch: interrupted after (\d+) of 4 images; rerun the same command to resume", line)
    assert found, line
    done = int(found[1])
    assert 1 <= done < 4 and len(manifest_files(run_dir)) == done, "the line counts the images kept"
    assert_complete(run_dir, done)
    assert not temp_files(run_dir)
    again = run_cli(args, cache_dir, tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{4 - done} new image(s), {done} already done" in again.stderr
    assert_complete(run_dir, 4)


@pytest.mark.slow  # ~15 s: a sweep killed and resumed (in .ci/run's slow stage)
def test_sigint_in_a_multirun_gives_the_sweep_resume_hint(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *SLOW, "images_per_prompt=3", "seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = _interrupt_after_first_png(args, cache_dir, tmp_path, sweep / "0", signal.SIGINT)
    line = one_line(proc, 130)
    assert re.fullmatch(r"sdbatch: interrupted after \d of 3 images in job 0; rerun the same -m command to resume; "
                        r"finished jobs are skipped", line), line
    assert "interrupted (SIGINT)" in json.loads((sweep / "0" / "job.json").read_text())["error"]
    again = run_cli(args, cache_dir, tmp_path)
    assert again.returncode == 0, again.stderr
    for job in ("0", "1"):
        assert_complete(sweep / job, 3)


def test_resume_hint_names_a_default_directory() -> None:
    from sdbatch.cli.hydra_app import resume_hint

    def cfg(mode, *overrides):
        return SimpleNamespace(mode=mode, overrides=SimpleNamespace(hydra=list(overrides)),
                               run=SimpleNamespace(dir="outputs/2026-11-30/10-00-00"),
                               sweep=SimpleNamespace(dir="multirun/my sweep"))

    assert resume_hint(cfg(RunMode.RUN, "hydra.run.dir=x")) == "rerun the same command to resume"
    assert resume_hint(cfg(RunMode.RUN)) == ("rerun the same command with hydra.run.dir=outputs/2026-11-30/10-00-00"
                                             " to resume")
    assert resume_hint(cfg(RunMode.MULTIRUN)) == ("rerun the same -m command with hydra.sweep.dir='multirun/my "
                                                  "sweep' to resume; finished jobs are skipped")


def test_an_interrupted_interactive_session_has_nothing_to_resume() -> None:
    from sdbatch.cli.hydra_app import interrupted_line

    ex = Interrupted(signal.SIGINT)
    ex.done, ex.interactive = 2, True
    assert interrupted_line(ex) == "sdbatch: interrupted after 2 image(s); the interactive session's images are kept"


def test_an_interrupt_waits_for_the_image_being_written(tmp_path) -> None:
    with pytest.raises(Interrupted) as caught:
        with deferred_interrupts():
            files._on_signal(signal.SIGTERM, None)  # what the installed handler does on SIGTERM
            atomic_write_text(tmp_path / "a.txt", "whole")  # nested: still held
            written = True
    assert written and caught.value.signum == signal.SIGTERM
    assert (tmp_path / "a.txt").read_text() == "whole" and not temp_files(tmp_path)
    with pytest.raises(Interrupted):
        files._on_signal(signal.SIGINT, None)  # outside a write: at once


# ---------------------------------------------------------------- unwritable and full disks


def _finished_run(cache: Path, cwd: Path, run_dir: Path) -> list[str]:
    proc = run_cli([*SMALL, "sampler.steps=2", "seed=3", f"hydra.run.dir={run_dir}"], cache, cwd)
    assert proc.returncode == 0, proc.stderr
    return sorted(p.name for p in run_dir.rglob("*"))


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_existing_directory_without_write_permission(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    before = _finished_run(cache_dir, tmp_path, run_dir)
    args = [*SMALL, "sampler.steps=2", "seed=3", "images_per_prompt=2", f"hydra.run.dir={run_dir}"]
    line = one_line(run_cli(args, cache_dir, tmp_path, fault=f"eacces:{run_dir}"), 2)
    assert line.startswith(f"sdbatch: error: cannot write {run_dir}") and "Permission denied" in line, line
    assert sorted(p.name for p in run_dir.rglob("*")) == before


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
@needs_unshare
def test_existing_directory_on_a_read_only_mount(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    before = _finished_run(cache_dir, tmp_path, run_dir)
    args = [*SMALL, "sampler.steps=2", "seed=3", "images_per_prompt=2", f"hydra.run.dir={run_dir}"]
    proc = run_in_namespace(f"mount --bind -o ro '{run_dir}' '{run_dir}'", args, cache_dir, tmp_path)
    line = one_line(proc, 2)
    assert line.startswith(f"sdbatch: error: cannot write {run_dir}") and "Read-only file system" in line, line
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def _disk_and_args(tmp_path, multirun: bool) -> tuple:
    """(a folder to fill, the run or sweep directory inside it, the command's arguments)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    target = disk / "out"
    args = [*(["-m", "seed=1,2", f"hydra.sweep.dir={target}"] if multirun else [f"hydra.run.dir={target}"]),
            *SMALL, "sampler.steps=2"]
    return disk, target, args


@pytest.mark.parametrize("multirun", [False, True])
def test_disk_full_at_the_start(multirun, cache_dir, tmp_path) -> None:
    disk, target, args = _disk_and_args(tmp_path, multirun)
    line = one_line(run_cli(args, cache_dir, tmp_path, fault=f"full:{disk}"), 2)
    assert line.startswith(f"sdbatch: error: cannot write {target}") and "No space left on device" in line, line


@needs_unshare
@pytest.mark.parametrize("multirun", [False, True])
def test_disk_full_at_the_start_on_a_tiny_file_system(multirun, cache_dir, tmp_path) -> None:
    disk, target, args = _disk_and_args(tmp_path, multirun)
    fill = f"mount -t tmpfs -o size=64k tmpfs '{disk}' && (head -c 200000 /dev/zero > '{disk}/fill' 2>/dev/null; true)"
    line = one_line(run_in_namespace(fill, args, cache_dir, tmp_path), 2)
    assert line.startswith(f"sdbatch: error: cannot write {target}") and "No space left on device" in line, line


@pytest.mark.slow  # end-to-end in subprocesses: the slow stage of .ci/run
def test_disk_full_mid_run_keeps_what_was_written(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, "sampler.steps=2", "seed=7", "images_per_prompt=3", f"hydra.run.dir={run_dir}"]
    line = one_line(run_cli(args, cache_dir, tmp_path, fault="enospc-png:1"), 2)
    assert line == (f"sdbatch: error: cannot write {run_dir / '00001-8.png'}: No space left on device; "
                    "free some space, then rerun to resume")
    assert_complete(run_dir, 1)
    assert not temp_files(run_dir)
    again = run_cli(args, cache_dir, tmp_path)
    assert again.returncode == 0 and "2 new image(s), 1 already done" in again.stderr, again.stderr
    assert_complete(run_dir, 3)


@pytest.mark.slow  # ~15 s: a sweep run twice (in .ci/run's slow stage)
def test_disk_full_in_a_multirun_fails_the_job_and_stops_the_sweep(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *SMALL, "sampler.steps=2", "images_per_prompt=2", "seed=1,2,3", f"hydra.sweep.dir={sweep}"]
    line = one_line(run_cli(args, cache_dir, tmp_path, fault="enospc-png:3"), 2)
    assert line.startswith(f"sdbatch: error: job 1: cannot write {sweep / '1' / '00001-3.png'}: No space left on "
                           "device") and "the sweep stopped there (1 of 3 job(s) done" in line, line
    jobs = [json.loads(line) for line in (sweep / "sweep.jsonl").read_text().splitlines()]
    assert [(j["status"], j["disk_full"]) for j in jobs] == [("completed", False), ("failed", True),
                                                             ("cancelled", False)]
    assert "No space left on device" in jobs[1]["error"] and "disk is full" in jobs[2]["error"]
    assert not temp_files(sweep), "no temporary file is left behind (today: a 0-byte .job.json.tmp)"
    assert_complete(sweep / "0", 2)
    assert_complete(sweep / "1", 1)
    again = run_cli(args, cache_dir, tmp_path)  # space freed: the rerun resumes
    assert again.returncode == 0, again.stderr
    assert [j["status"] for j in map(json.loads, (sweep / "sweep.jsonl").read_text().splitlines())] == [
        "skipped", "completed", "completed"]
    for job in ("0", "1", "2"):
        assert_complete(sweep / job, 2)


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_disk_full_for_every_file_in_a_multirun_still_ends_in_one_line(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *SMALL, "sampler.steps=2", "images_per_prompt=2", "seed=1,2,3", f"hydra.sweep.dir={sweep}"]
    line = one_line(run_cli(args, cache_dir, tmp_path, fault="enospc-all:3"), 2)
    assert line.startswith(f"sdbatch: error: job 1: cannot write {sweep / '1' / '00001-3.png'}: No space left on "
                           "device"), line
    assert "(1 of 3 job(s) done)" in line, "sweep.jsonl could not be written either, so it is not referred to"
    assert not temp_files(sweep) and not (sweep / "sweep.jsonl").exists()
    assert_complete(sweep / "0", 2)
    assert_complete(sweep / "1", 1)


# ---------------------------------------------------------------- damaged images on resume


@pytest.mark.slow  # end-to-end in subprocesses: the slow stage of .ci/run
def test_damaged_listed_images_are_made_again_on_resume(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, "sampler.steps=2", "seed=5", "images_per_prompt=3", f"hydra.run.dir={run_dir}"]
    assert run_cli(args, cache_dir, tmp_path).returncode == 0
    good = (run_dir / "00001-6.png").read_bytes()
    (run_dir / "00001-6.png").write_bytes(good[: len(good) // 2])  # cut short
    (run_dir / "00002-7.png").write_bytes(b"")  # emptied
    untouched = (run_dir / "00000-5.png").stat().st_mtime_ns
    again = run_cli(args, cache_dir, tmp_path)
    assert again.returncode == 0 and "2 new image(s), 1 already done" in again.stderr, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "00001-6.png, 00002-7.png" in warnings[0], warnings
    assert (run_dir / "00001-6.png").read_bytes() == good, "made again, the same pixels and metadata"
    assert (run_dir / "00000-5.png").stat().st_mtime_ns == untouched
    assert manifest_files(run_dir) == ["00000-5.png", "00001-6.png", "00002-7.png", "00001-6.png", "00002-7.png"]
    third = run_cli(args, cache_dir, tmp_path)
    assert "0 new image(s), 3 already done" in third.stderr and "WARNING" not in third.stderr


def test_intact_image_checks_the_png_ends(tmp_path) -> None:
    whole = tmp_path / "whole.png"
    Image.new("RGB", (8, 8)).save(whole)
    data = whole.read_bytes()
    cases = {"cut.png": data[:-5], "empty.png": b"", "garbage.png": b"x" * len(data), "tail.png": b"y" + data[1:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert not intact_image(tmp_path / name), name
    assert intact_image(whole) and not intact_image(tmp_path / "missing.png")


def test_manifest_keeps_the_last_line_per_file(tmp_path) -> None:
    lines = [{"file": "a.png", "seed": 1}, {"file": "b.png", "seed": 2}, {"file": "a.png", "seed": 3}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert RunDir(tmp_path)._load_manifest() == {"a.png": lines[2], "b.png": lines[1]}


# ---------------------------------------------------------------- one writer per run directory


@pytest.mark.slow  # end-to-end in subprocesses: the slow stage of .ci/run
def test_a_second_process_into_a_busy_run_directory_exits_2(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [*SLOW, "images_per_prompt=4", f"hydra.run.dir={run_dir}"]  # seed=null: one base seed only
    first = subprocess.Popen(_command(args), cwd=tmp_path, env=_env(cache_dir), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_png(first, run_dir)
        second = run_cli(args, cache_dir, tmp_path)
        _, first_err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    line = one_line(second, 2)
    assert line == (f"sdbatch: error: run directory {run_dir} is in use by another sdbatch process "
                    f"(PID {first.pid}); wait for it to finish, or set hydra.run.dir to another folder")
    assert first.returncode == 0, first_err
    assert_complete(run_dir, 4)
    assert len({json.loads(line)["seed"] - i for i, line in
                enumerate((run_dir / "manifest.jsonl").read_text().splitlines())}) == 1, "one base seed"


def test_run_directory_lock_names_the_holder_and_clears_stale_temporaries(tmp_path) -> None:
    (tmp_path / ".00001-6.png.4242.tmp").write_bytes(b"half an image")  # left by a process killed with -9
    (tmp_path / ".notes.tmp").write_text("not ours")
    with RunDir(tmp_path).locked():
        assert not (tmp_path / ".00001-6.png.4242.tmp").exists() and (tmp_path / ".notes.tmp").exists()
        assert (tmp_path / files.PID_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=rf"in use by another sdbatch process \(PID {os.getpid()}\)"):
            with RunDir(tmp_path).locked():
                pass
    assert not (tmp_path / files.PID_FILE).exists()
    with RunDir(tmp_path).locked():  # released: the next run takes it
        pass


def _add_hashes(cache: str, worker: int) -> None:
    os.environ["SDBATCH_CACHE"] = cache
    from sdbatch.engine.models import checkpoint

    for i in range(25):
        checkpoint._write_hash_file((f"/models/{worker}-{i}.safetensors", i, i), f"{worker:02d}{i:062d}")


def test_hash_cache_updates_from_several_processes_are_all_kept(tmp_path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_hashes, args=(str(tmp_path), n)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0] * 4
    data = json.loads((tmp_path / "hashes.json").read_text())
    assert len(data) == 100, "an update lost another process's entries"


# ---------------------------------------------------------------- the one atomic-write helper


def test_every_whole_file_goes_through_the_atomic_helper(tmp_path, monkeypatch) -> None:
    from sdbatch.outputs.sweep_index import SweepIndex, write_job_result

    written: list[str] = []
    real = files.atomic_write

    def recording(target, write):
        written.append(Path(target).name)
        return real(target, write)

    monkeypatch.setattr(files, "atomic_write", recording)
    job_dir = tmp_path / "sweep" / "0"
    run = RunDir(job_dir)
    run.write_config({"seed": 1}, {})
    job = ImageJob(index=0, file_name="00000-1.png", prompt="x", negative_prompt="", seed=1, width=8, height=8,
                   steps=2, sampler="ddim", schedule="default", cfg_scale=7.0, eta=0.0, origin="prompt")
    model = ModelInfo(name="tiny", hash="0123456789", family="sd1", v_prediction=False, clip_skip=1, precision="fp32")
    run.save(Image.new("RGB", (8, 8), (9, 9, 9)), image_params(job, model, "0.1.0"))
    run.save_grid(["00000-1.png"], 1)
    write_job_result(job_dir, {"num": 0, "overrides": ["seed=1"], "status": "completed"})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "output_subdir": ".hydra"}})
    SweepIndex().on_multirun_end(config)
    assert written == ["config.yaml", "00000-1.png", "grid.png", "job.json", "sweep.jsonl", "contact_sheet.png",
                       "index.html"]  # the sweep's gallery page
    assert not temp_files(tmp_path)


def test_a_failed_atomic_write_keeps_the_previous_file(tmp_path) -> None:
    target = tmp_path / "sheet.png"
    target.write_bytes(b"previous")

    def fails(fh) -> None:
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.atomic_write(target, fails)
    assert target.read_bytes() == b"previous" and not temp_files(tmp_path)
