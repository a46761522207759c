"""Hydra's side of the schema: mutable twins of the frozen spec classes, registered in the ConfigStore.

The frozen classes (`sdbatch.config.spec`) are the run spec the rest of sdbatch reads. Hydra needs mutable
classes to compose into, so `register_configs` registers twins generated from the frozen ones: one
definition, typos and wrong types still fail at compose time with the full key.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field

from hydra.core.config_store import ConfigStore

from sdbatch.config.spec import GROUPS, RunSpec


@functools.cache
def schema_of(cls: type) -> type:
    """A mutable dataclass with the same name, fields and defaults as the frozen `cls` (for Hydra)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            tp = schema_of(tp)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            tp = list[schema_of(typing.get_args(tp)[0])]  # list elements need the mutable twin too
        if f.default_factory is dataclasses.MISSING:
            spec = field(default=f.default)
        elif dataclasses.is_dataclass(f.default_factory):
            spec = field(default_factory=tp)  # nested group with defaults: use the mutable twin
        else:
            spec = field(default_factory=f.default_factory)
        fields.append((f.name, tp, spec))
    twin = dataclasses.make_dataclass(cls.__name__, fields)
    # A findable module-level name: launchers (joblib, submitit, ray) pickle the ConfigStore to their
    # workers, and a schema pickled by value loses its fields' dataclasses.MISSING identity there.
    twin.__module__, twin.__qualname__ = __name__, f"_{cls.__name__}Schema"
    globals()[twin.__qualname__] = twin
    return twin


def register_configs() -> None:
    """Store the schemas: `base_config` for the root, `schema/<group>/base` for each group's options.

    Group schemas live outside their group so that `sampler=glob(*)` sweeps only real options.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=schema_of(RunSpec))
    for group, cls in GROUPS.items():
        cs.store(group=f"schema/{group}", name="base", node=schema_of(cls))


schema_of(RunSpec)  # generate every twin at import, so a launcher's worker finds them by name when unpickling
