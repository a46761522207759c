"""What a gallery page shows, as JSON-able data: the images of a run or a sweep, their parameters, infotext and
reproducing command, and the dimensions the X/Y view can lay them out by.

A run's dimensions are its fused grid's axes (from config.yaml; an image's cell follows from its planned index,
z slowest and x fastest), plus "image" when several planned images were expanded. A sweep's are its swept keys,
plus "image" (the n-th image of each job) when a job made more than one. Paths are relative to the page.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from sdbatch.config.grid_axes import Axis, axis_given, parse_axis
from sdbatch.errors import ConfigError
from sdbatch.outputs.files import mtime_ns
from sdbatch.outputs.manifest_read import manifest_records
from sdbatch.outputs.metadata import infotext
from sdbatch.outputs.reproduce import command, run_overrides
from sdbatch.outputs.sweep_index import JobRecord, split_override, swept_keys
from sdbatch.outputs.thumbnails import thumbnail

IMAGE_DIM = "image"  # the n-th planned image (a run) or the n-th image of a job (a sweep)


def run_page_data(run_dir: Path, *, live: bool, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run page's data: every image in the manifest, in order; `live` while the run goes on.

    `cache` (a dict the caller keeps between calls) saves a live page's rewrites the work for images it has
    already described: an entry is reused while the image's record and file are unchanged.
    """
    run_dir = Path(run_dir)
    records = manifest_records(run_dir)
    axes = _grid_axes(run_dir)
    cells = _grid_cells(axes, records)
    overrides = run_overrides(run_dir)
    cache = {} if cache is None else cache
    items = [_cached_item(cache, run_dir, record, overrides, cell) for record, cell in zip(records, cells, strict=True)]
    dims = [{"key": axis.key, "values": list(axis.values)} for axis in axes]
    if axes and len({cell.get(IMAGE_DIM) for cell in cells}) > 1:
        dims.append({"key": IMAGE_DIM, "values": _ordered(cell[IMAGE_DIM] for cell in cells)})
    return {"kind": "run", "title": run_dir.name, "live": live, "generated": _now(), "dims": dims, "items": items}


def sweep_page_data(sweep_dir: Path, jobs: list[JobRecord]) -> dict[str, Any]:
    """The sweep page's data: every job's images (failed jobs as one item with their error), swept keys as dims."""
    sweep_dir = Path(sweep_dir)
    keys = swept_keys(jobs)
    values_of = {job.num: _job_values(job, keys) for job in jobs}
    items, most = [], 1
    for job in jobs:
        values = values_of[job.num]
        records = manifest_records(sweep_dir / job.run_dir)
        most = max(most, len(records))
        overrides = run_overrides(sweep_dir / job.run_dir)
        for n, record in enumerate(records, start=1):
            run_dir = sweep_dir / job.run_dir
            item = _item(run_dir, f"{job.run_dir}/", record, overrides, {**values, IMAGE_DIM: str(n)},
                         mtime_ns(run_dir / str(record["file"])))
            items.append({**item, "job": job.num, "status": job.status})
        if not records:
            items.append({"file": None, "job": job.num, "status": job.status, "cell": {**values, IMAGE_DIM: "1"},
                          "error": job.error or "no images", "overrides": job.overrides})
    dims = [{"key": key, "values": _ordered(values_of[job.num][key] for job in jobs)} for key in keys]
    if most > 1:
        dims.append({"key": IMAGE_DIM, "values": [str(n) for n in range(1, most + 1)]})
    failed = sum(job.status in ("failed", "cancelled") for job in jobs)
    return {"kind": "sweep", "title": sweep_dir.name, "live": False, "generated": _now(), "dims": dims,
            "items": items, "jobs": len(jobs), "failed": failed}


def _cached_item(cache: dict[str, Any], run_dir: Path, record: Mapping[str, Any], overrides: list[str] | None,
                 cell: Mapping[str, str]) -> dict[str, Any]:
    modified = mtime_ns(run_dir / str(record["file"]))
    key = (record, modified, overrides, cell)
    hit = cache.get(record["file"])
    if hit is None or hit[0] != key:
        hit = cache[record["file"]] = (key, _item(run_dir, "", record, overrides, cell, modified))
    return hit[1]


def _item(run_dir: Path, prefix: str, record: Mapping[str, Any], overrides: list[str] | None,
          cell: Mapping[str, str], modified: int | None) -> dict[str, Any]:
    """One image: its path and thumbnail (relative to the page), time (from `modified`, the file's mtime in ns),
    record, infotext and command."""
    file = str(record["file"])
    grid_cell = {key: value for key, value in cell.items() if key != IMAGE_DIM and not prefix}
    when = modified / 1e9 if modified is not None else None
    return {"file": prefix + file, "thumb": prefix + thumbnail(run_dir, file), "time": when,
            "params": dict(record), "infotext": infotext(record), "command": command(record, overrides, grid_cell),
            "cell": dict(cell), "status": "completed"}


def _job_values(job: JobRecord, keys: list[str]) -> dict[str, str]:
    given = dict(split_override(o) for o in job.overrides)
    return {key: given.get(key, "(default)") for key in keys}


def _grid_axes(run_dir: Path) -> list[Axis]:
    """The run's fused-grid axes from its config.yaml (none without one, or when it cannot be read)."""
    try:
        grid = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("grid") or {}
        return [parse_axis(grid[name], name) for name in "xyz" if axis_given(grid.get(name))]
    except (OSError, yaml.YAMLError, ConfigError, AttributeError):
        return []


def _grid_cells(axes: list[Axis], records: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Each record's cell: its axis values and its planned image ("1", "2", ...), from its planned index."""
    per_base = math.prod(len(axis.values) for axis in axes)
    cells = []
    for record in records:
        index = record.get("index")
        if not axes or not isinstance(index, int):
            cells.append({})
            continue
        cell, rest = {}, index % per_base
        for axis in axes:  # x is fastest
            rest, at = divmod(rest, len(axis.values))
            cell[axis.key] = axis.values[at]
        cells.append({**cell, IMAGE_DIM: str(index // per_base + 1)})
    return cells


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
