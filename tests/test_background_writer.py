"""The background image writer: order, nothing lost on errors or interrupts, the worker's errors raised in the run."""

from __future__ import annotations

import threading

import pytest
from test_outputs import make_params, small_image

from sdbatch.errors import OutputError
from sdbatch.outputs.background_writer import BackgroundWriter
from sdbatch.outputs.run_dir import RunDir
from sdbatch.outputs.sweep_index import manifest_files


def test_writes_in_order_while_the_caller_goes_on(tmp_path) -> None:
    out = RunDir(tmp_path)
    gate, real = threading.Event(), out.save
    out.save = lambda image, params: (gate.wait(10), real(image, params))[1]
    with BackgroundWriter(out, depth=4) as writer:
        paths = [writer.submit(small_image(i), make_params(i)) for i in range(3)]
        assert manifest_files(tmp_path) == []  # the writer is still at the first image: the caller was not held
        gate.set()
    assert manifest_files(tmp_path) == [p.name for p in paths] == out.saved  # all there when the block ends
    assert all(p.is_file() for p in paths)


def test_an_error_in_the_run_still_writes_what_was_made(tmp_path) -> None:
    out = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt), BackgroundWriter(out, depth=4) as writer:
        for i in range(3):
            writer.submit(small_image(i), make_params(i))
        raise KeyboardInterrupt
    assert len(manifest_files(tmp_path)) == 3


def test_a_write_error_is_raised_in_the_run_and_stops_the_writes(tmp_path) -> None:
    out = RunDir(tmp_path)
    real = out.save

    def full_after_one(image, params):
        if out.saved:
            raise OutputError(f"cannot write {params['file']}: no space left on device")
        return real(image, params)

    out.save = full_after_one
    with pytest.raises(OutputError, match="no space left"), BackgroundWriter(out, depth=8) as writer:
        for i in range(4):
            writer.submit(small_image(i), make_params(i))
    assert manifest_files(tmp_path) == ["00000-1000.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-1000.png"]


def test_depth_zero_writes_on_the_calling_thread(tmp_path) -> None:
    out = RunDir(tmp_path)
    with BackgroundWriter(out, depth=0) as writer:
        path = writer.submit(small_image(), make_params(0))
        assert path.is_file() and manifest_files(tmp_path) == [path.name]  # written before submit returned
    with pytest.raises(OutputError), BackgroundWriter(out, depth=0) as writer:
        out.save = lambda image, params: (_ for _ in ()).throw(OutputError("disk full"))
        writer.submit(small_image(1), make_params(1))
