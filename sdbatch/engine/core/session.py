"""A patch session: one run's changes to the shared, cached models, each undone when the run ends.

Engines on one loaded model share its modules, so at most one session is open per model. Every feature's
`patch` (LoRA, XTI) is recorded as it is made; `close` restores them in reverse order, whatever happened in
between (an exception mid-batch, a KeyboardInterrupt), so the cached model is plain again for the next run.
"""

from __future__ import annotations

from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import Patch

_OPEN: set[int] = set()  # id() of the model bundles a session is patching now


class Session:
    """The run's settings and the patches it made on the models, by feature name."""

    def __init__(self, bundle: object, run: RunSpec) -> None:
        if id(bundle) in _OPEN:
            raise RuntimeError("a session is already open on this model; close it before starting another run")
        _OPEN.add(id(bundle))
        self._bundle_id = id(bundle)
        self.run = run
        self.patches: dict[str, Patch] = {}

    def add(self, name: str, patch: Patch) -> None:
        self.patches[name] = patch

    def close(self) -> None:
        """Undo every patch, last made first; the session is over even if one of them fails."""
        try:
            while self.patches:
                _, patch = self.patches.popitem()
                patch.restore()
        finally:
            _OPEN.discard(self._bundle_id)

