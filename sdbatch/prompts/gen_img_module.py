"""gen_img.py-style prompt modules: `get_prompter(args, pipe, networks)` returning a callable prompter.

The reference loads `--from_module FILE` and calls `get_prompter(args, pipe, networks)` once; the prompter it
returns is then called as `prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step)` until it
returns None, which ends the pass (gen_img_inventory.md §14). sdbatch runs such a module where it only reads
`args` and returns prompt lines: `args` is the reference's namespace read back from the run spec (every flag,
its sdbatch key's value or the reference's default; `args.prompter_module_args` is `prompts.module_args`),
`seed_random` a `random.Random` seeded with the run's seed. `pipe` and `networks` stand for sdbatch's models,
which are not gen_img's objects: touching them is one PromptError line naming the module's line. A run
without networks passes an empty list, as the reference does.

sdbatch.prompts.module tells the two styles apart by get_prompter's signature and turns the lines this module
yields into prompt lines (caps, errors naming the item); n_iter repeats the lines of one pass.
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from sdbatch.config.gen_img_flags import reference_args
from sdbatch.errors import PromptError


class PipelineGuard:
    """Stands for gen_img's `pipe` or `networks`: any use is a one-line PromptError naming the module's line."""

    __slots__ = ("_what", "_path")

    def __init__(self, what: str, path: Path) -> None:
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_path", path)

    def _refuse(self, use: str) -> NoReturn:
        frame = sys._getframe(2)  # the module's code that touched us (past the dunder that called _refuse)
        where = f"{Path(frame.f_code.co_filename).name}, line {frame.f_lineno}"
        raise PromptError(f"prompt_module {self._path} ({where}) uses {self._what}{use}: sdbatch runs gen_img "
                          f"prompters that only read args and return prompt lines; {self._what} is not gen_img's")

    def __getattr__(self, name: str) -> NoReturn:
        self._refuse(f".{name}")

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        self._refuse(f".{name} = ...")

    def __getitem__(self, index: Any) -> NoReturn:
        self._refuse(f"[{index!r}]")

    def __len__(self) -> NoReturn:
        self._refuse(" (len)")

    def __iter__(self) -> NoReturn:
        self._refuse(" (iterating)")

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse("(...)")


def accepts(function: Callable, *args: Any) -> bool:
    """Whether `function` can be called with these positional arguments (a callable without a signature can)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins and some callables have no signature: just call them
        return True
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def gen_img_items(path: Path, get_prompter: Callable, spec: Any) -> Iterator[Any]:
    """Call get_prompter(args, pipe, networks) now, then yield what the prompter returns until None (one pass).

    The module's own exceptions propagate (sdbatch.prompts.module names the item and the line); a guard's
    PromptError is already one line.
    """
    args = argparse.Namespace(**reference_args(spec))
    pipe = PipelineGuard("pipe", path)
    networks: Any = PipelineGuard("networks", path) if spec.network.loras else []
    prompter = get_prompter(args, pipe, networks)
    if not callable(prompter):
        raise PromptError(f"prompt_module {path}: get_prompter(args, pipe, networks) returned "
                          f"{type(prompter).__name__}; gen_img wants a callable prompter")
    return _prompts(prompter, args, pipe, spec)


def _prompts(prompter: Callable, args: argparse.Namespace, pipe: PipelineGuard, spec: Any) -> Iterator[Any]:
    seed_random = random.Random(spec.seed)  # reproducible for a given seed (None: from the OS, as gen_img)
    iter_seed = seed_random.randint(0, 2**32 - 1) if spec.iter_same_seed else None
    index = 0
    while (item := prompter(args, pipe, seed_random, iter_seed, index, index * spec.images_per_prompt)) is not None:
        yield item
        index += 1
