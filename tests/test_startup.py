"""The engine's first import runs with the cyclic GC paused and freezes what it built, once per process."""

from __future__ import annotations

import gc

import pytest

from sdbatch.cli import startup


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(startup, "_frozen", False)
    yield
    gc.unfreeze()  # give the test process's objects back to the collector


def test_first_use_pauses_the_collector_then_freezes_and_restores_it(fresh) -> None:
    assert gc.isenabled()
    with startup.heavy_imports():
        assert not gc.isenabled()
        made = [[] for _ in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() >= len(made)


def test_later_uses_leave_the_collector_alone(fresh) -> None:
    with startup.heavy_imports():
        pass
    gc.unfreeze()
    with startup.heavy_imports():
        assert gc.isenabled(), "a multirun's later jobs collect garbage as usual"
    assert gc.get_freeze_count() == 0, "nothing of the jobs before is frozen"


def test_a_disabled_collector_stays_disabled(fresh) -> None:
    gc.disable()
    try:
        with startup.heavy_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_in_the_block_still_restores_the_collector(fresh) -> None:
    with pytest.raises(ImportError), startup.heavy_imports():
        raise ImportError("no torch")
    assert gc.isenabled()
