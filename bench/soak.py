"""Soak test: RSS of one process over an N-job multirun (basic launcher, `model=tiny`, 64×64, 2 steps).

Runs `python run.py -m ... seed='range(0,N)'` with a measuring Hydra callback added on the command line
(`+hydra.callbacks.soak_probe`, the `RssProbe` class below, imported from this folder; sdbatch itself carries
no probe). At the start of each job it appends to a file: the job number, the process's RSS (VmRSS) with its
anonymous and file-backed parts (RssAnon, RssFile), and glibc malloc's bytes in use and free (mallinfo2). Then
it prints a table every ~10% of the jobs, the growth per job (least-squares slope of RSS over jobs 10…N-1)
and job N-1's RSS against job 10's. Extra arguments are more run.py overrides (the last one of a key wins).

    nice -n 10 python bench/soak.py --jobs 200               # ~1.5 minutes on 2 shared CPU cores
    nice -n 10 python bench/soak.py --jobs 1000              # ~7 minutes (~1 of them composing the job configs)
    nice -n 10 python bench/soak.py --jobs 60 --diagnose     # ~5 minutes: tracemalloc makes jobs ~10x slower

--diagnose starts tracemalloc at job 10 and, at the last job's start, prints the allocations that grew most (by
traceback) and the object types whose live count grew, after a gc.collect() (gc.get_objects() leaves out
frozen objects: the count of those is printed too).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIRST = 10  # the reference job: models loaded, caches warm


def rss_kb() -> tuple[int, int, int]:
    """The process's resident set size now (VmRSS) and its anonymous and file-backed parts (RssAnon, RssFile:
    the mapped model files and libraries, which the page cache can evict and fault in again), in KiB; without
    /proc, ru_maxrss (the peak) and -1, -1."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "RssAnon", "RssFile")))
        return tuple(int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile"))  # type: ignore[return-value]
    except (OSError, KeyError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, -1, -1


def heap_kb() -> tuple[int, int]:
    """glibc malloc's (bytes in use, free bytes held) in KiB (mallinfo2), or (-1, -1) without glibc ≥ 2.33.

    In use growing means something keeps objects (Python or native); free growing means fragmentation."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return -1, -1
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024, info.fordblks // 1024


try:  # the probe is a Hydra callback; this script also runs where only the standard library is imported
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


def _type_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


class RssProbe(Callback):
    """Hydra callback (measurement only): appends "job_num rss_kib" at each job's start to `out`."""

    def __init__(self, out: str, last: int = -1, diagnose: bool = False) -> None:
        self.out = Path(out)
        self.last = last
        self.diagnose = diagnose
        self.counts: collections.Counter[str] | None = None
        self.snapshot: Any = None

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        num = int(config.hydra.job.num)
        with self.out.open("a", encoding="ascii") as out:
            out.write(f"{num} {' '.join(map(str, (*rss_kb(), *heap_kb())))}\n")
        if not self.diagnose:
            return
        if num == FIRST:
            self.counts = _type_counts()
            tracemalloc.start(12)
            self.snapshot = tracemalloc.take_snapshot()
        elif num == self.last and self.snapshot is not None:
            self._report(num)

    def _report(self, num: int) -> None:
        gc.collect()
        after = tracemalloc.take_snapshot()
        filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
        stats = after.filter_traces(filters).compare_to(self.snapshot.filter_traces(filters), "traceback")
        jobs = num - FIRST
        lines = [f"== tracemalloc, job {FIRST} -> job {num} ({jobs} jobs): top growth by traceback"]
        total = sum(s.size_diff for s in stats)
        lines.append(f"total traced growth {total / 1024:.1f} KiB = {total / jobs / 1024:.2f} KiB/job")
        for stat in stats[:15]:
            if stat.size_diff <= 0:
                break
            lines.append(f"+{stat.size_diff / 1024:.1f} KiB ({stat.count_diff:+d} blocks)")
            lines.extend("    " + ln for ln in stat.traceback.format(most_recent_first=True)[:16])
        tracemalloc.stop()
        counts = _type_counts()
        grown = sorted(((counts[k] - self.counts.get(k, 0), k) for k in counts), reverse=True)
        lines.append(f"== live objects by type, job {FIRST} -> job {num} (after gc.collect; "
                     f"{gc.get_freeze_count()} frozen objects not counted)")
        lines.extend(f"{n:+7d} ({n / jobs:+.2f}/job) {k}" for n, k in grown[:25] if n > 0)
        with self.out.with_suffix(".diag").open("w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")


def _slope(points: list[tuple[int, int]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--diagnose", action="store_true", help="tracemalloc and gc type counts, job 10 → last")
    parser.add_argument("--keep", type=Path, help="sweep directory to keep (default: a temporary one)")
    parser.add_argument("--rss-file", type=Path, help="write the per-job lines here: job, RSS, RssAnon, RssFile, "
                        "heap in use, heap free (KiB)")
    parser.add_argument("extra", nargs="*", help="more overrides for run.py")
    args = parser.parse_args()
    if args.jobs <= FIRST + 1:
        sys.exit(f"--jobs must be more than {FIRST + 1}")
    with tempfile.TemporaryDirectory(prefix="sdbatch-soak-") as tmp:
        sweep = args.keep or Path(tmp) / "sweep"
        out = Path(tmp) / "rss.txt"
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", "model=tiny", "prompt=a cat", f"seed=range(0,{args.jobs})",
               "width=64", "height=64", "sampler.steps=2", "perf.progress=false", f"hydra.sweep.dir={sweep}",
               "hydra.callbacks.sweep_index.contact_sheet=false",
               "+hydra.callbacks.soak_probe._target_=soak.RssProbe", f"+hydra.callbacks.soak_probe.out={out}",
               f"+hydra.callbacks.soak_probe.last={args.jobs - 1}",
               f"+hydra.callbacks.soak_probe.diagnose={str(args.diagnose).lower()}", *args.extra]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "bench"), os.environ.get("PYTHONPATH")) if p)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = {int(r[0]): [int(v) for v in r[1:]] for r in (ln.split() for ln in out.read_text().splitlines())}
        if args.rss_file:
            args.rss_file.write_text(out.read_text())
        rss = {k: v[0] for k, v in rows.items()}
        last = max(rss)
        per_job = _slope([(k, v) for k, v in rss.items() if k >= FIRST])  # KiB per job
        print(f"{len(rss)} jobs in {seconds:.0f} s ({seconds / len(rss):.2f} s/job)")
        print(f"{'job':>5} {'RSS MiB':>8} {'vs job ' + str(FIRST):>9} {'anon':>7} {'file':>7} {'heap in use':>11} "
              f"{'heap free':>9}")
        marks = sorted({FIRST, 100, *range(0, last, max(100, last // 10)), last} & set(rss))
        for job in (j for j in marks if j >= FIRST):
            _, anon, file, used, free = rows[job]
            print(f"{job:5d} {rss[job] / 1024:8.1f} {(rss[job] - rss[FIRST]) / rss[FIRST]:+9.1%} {anon / 1024:7.1f} "
                  f"{file / 1024:7.1f} {used / 1024:11.1f} {free / 1024:9.1f}")
        print(f"growth per job (slope over jobs {FIRST}..{last}): {per_job:.1f} KiB "
              f"= {per_job / 1024:.3f} MiB; at job 1000 that is {per_job * (1000 - FIRST) / rss[FIRST]:+.1%} "
              f"of job {FIRST}'s RSS")
        print(f"job {last} vs job {FIRST}: {(rss[last] - rss[FIRST]) / 1024:+.1f} MiB "
              f"({(rss[last] - rss[FIRST]) / rss[FIRST]:+.1%})")
        diag = out.with_suffix(".diag")
        if diag.exists():
            print(diag.read_text())


if __name__ == "__main__":
    main()
