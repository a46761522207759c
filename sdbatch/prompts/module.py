"""Prompt modules (`prompt_module=FILE.py`): a user's Python file that generates the run's prompt lines.

The file must define a function ``get_prompter(spec, engine)``. sdbatch calls it once, after the model is
loaded, with two arguments, both passed through untouched:

- ``spec``: the run's resolved config, a frozen ``sdbatch.config.spec.RunSpec``. Read any value from it,
  e.g. ``spec.width``, ``spec.seed``, ``spec.negative_prompt``, ``spec.model.checkpoint``. It cannot be changed.
- ``engine``: the loaded ``sdbatch.engine.core.engine.Engine``, giving access to the models, e.g.
  ``engine.bundle.tokenizer`` or ``engine.bundle.text_encoder``.

``get_prompter`` returns an iterable of prompt lines (a list, or anything a ``for`` loop accepts), or is itself
a generator function that yields them. Each item is one of:

- a ``str``: one prompt line, exactly as it would appear in a ``prompt_file``; in-prompt options are allowed
  (``"a cat --w 768 --h 512 --n blurry"``). Blank strings are skipped.
- a ``dict`` with the key ``"prompt"`` (a ``str``, in-prompt options allowed) and optionally
  ``"negative_prompt"`` (a ``str``), which replaces the run's ``negative_prompt`` for that line; an in-prompt
  ``--n`` still wins over both. Other keys are an error (a misspelt key would otherwise be ignored).

Every line is read before the first image is made, at most ``prompts.max_module_lines`` items (default
100000): an endless generator stops with an error naming that key instead of filling memory. Lines are named
``FILE.py:#N`` (N = 1-based item number) in error messages and image metadata. An exception, or ``sys.exit()``,
raised by the module's code is reported as one line naming the module, the line of its code and the item being
made; a KeyboardInterrupt raised there is the user's Ctrl-C and ends the run as such.

Modules imported at the top of the file may live next to it: its folder is importable while the file runs,
and removed from ``sys.path`` afterwards (import helpers at the top of the file, not inside ``get_prompter``).
Example, ``prompts.py``::

    import itertools

    ANIMALS = ["cat", "dog", "fox"]
    STYLES = ["oil painting", "watercolor"]

    def get_prompter(spec, engine):
        for animal, style in itertools.product(ANIMALS, STYLES):
            yield f"a {animal}, {style} --w {spec.width}"
        yield {"prompt": "a red bird on a branch", "negative_prompt": "blurry, lowres"}
        yield "a portrait of a fox --n photo, cropped"

Run it with ``python run.py model.checkpoint=... prompt_module=prompts.py``. gen_img.py's ``--from_module``
files (``get_prompter(args, pipe, networks)`` returning a callable prompter) run too, where they only read
``args``: sdbatch.prompts.gen_img_module adapts them; get_prompter's signature tells the two apart.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import itertools
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from sdbatch.errors import ConfigError, PromptError
from sdbatch.prompts.gen_img_module import accepts, gen_img_items
from sdbatch.prompts.sources import PromptLine, clean_text

_DICT_KEYS = ("prompt", "negative_prompt")
MAX_LINES = 100_000  # default of prompts.max_module_lines
_counter = itertools.count()
# What the module's own code may raise that becomes a PromptError: every Exception and sys.exit(). Not
# KeyboardInterrupt (the user's Ctrl-C, or the module's own: it ends the run like Ctrl-C) nor GeneratorExit.
_MODULE_ERRORS = (Exception, SystemExit)


def load_prompter(path: str | Path, spec: Any, engine: Any, *, negative: str | None = None) -> Iterator[PromptLine]:
    """Load the prompt module at `path`, call its get_prompter(spec, engine) and iterate its prompt lines.

    Loading and the get_prompter call happen now (errors raise here); the items are converted as they are
    iterated. `negative` is the default negative prompt of each line (None: `spec.negative_prompt`, or "").
    At most `spec.prompts.max_module_lines` items are taken. Raises ConfigError if the file does not exist,
    PromptError for anything wrong inside it (an exception or sys.exit() in its code included).
    """
    path = Path(path)
    if negative is None:
        negative = getattr(spec, "negative_prompt", "") or ""
    negative = clean_text(negative, "negative_prompt")
    prompts = getattr(spec, "prompts", None)
    max_lines = getattr(prompts, "max_module_lines", MAX_LINES)
    module = _load_module(path)
    get_prompter = getattr(module, "get_prompter", None)
    if not callable(get_prompter):
        raise PromptError(f"prompt_module {path} defines no function get_prompter(spec, engine); add one")
    gen_img_style = _gen_img_style(path, get_prompter, spec, engine)
    call = "get_prompter(args, pipe, networks)" if gen_img_style else "get_prompter(spec, engine)"
    try:
        if gen_img_style:
            iterator = gen_img_items(path, get_prompter, spec)
        else:
            iterator = _iterate(path, get_prompter(spec, engine))
    except PromptError:
        raise
    except _MODULE_ERRORS as ex:
        raise PromptError(f"prompt_module {path}: {call} {_describe(ex, path)}") from ex
    return _lines(path, iterator, negative, max_lines)


def _iterate(path: Path, items: Any) -> Iterator[Any]:
    if isinstance(items, str | bytes | dict) or not isinstance(items, Iterable):
        raise PromptError(f"prompt_module {path}: get_prompter returned {type(items).__name__}; "
                          "return a list of prompt lines (str or dict) or yield them")
    return iter(items)


def _load_module(path: Path) -> ModuleType:
    """Execute the file as a fresh module with a unique name; its folder is on sys.path only meanwhile."""
    if not path.exists():
        raise ConfigError(f"prompt_module {path} does not exist; check the path (relative to {Path.cwd()})")
    if path.is_dir():
        raise ConfigError(f"prompt_module {path} is a folder, not a file; give the path of a .py file")
    if not path.is_file():
        raise ConfigError(f"prompt_module {path} is not a regular file; give the path of a .py file")
    name = f"sdbatch_prompt_module_{next(_counter)}"
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    saved_path = list(sys.path)
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module  # dataclasses and pickle look the module up by name
    try:
        loader.exec_module(module)
    except SyntaxError as ex:
        del sys.modules[name]
        raise PromptError(f"prompt_module {path}: syntax error at line {ex.lineno}: {_one_line(ex.msg)}") from None
    except _MODULE_ERRORS as ex:
        del sys.modules[name]
        raise PromptError(f"prompt_module {path} failed while loading: {_describe(ex, path)}") from ex
    except BaseException:  # KeyboardInterrupt: the user's Ctrl-C, not the module's error
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path[:] = saved_path
    return module


def _gen_img_style(path: Path, get_prompter: Any, spec: Any, engine: Any) -> bool:
    """Whether get_prompter is gen_img.py's get_prompter(args, pipe, networks) (sdbatch's takes (spec, engine));
    a signature that fits neither is a PromptError naming both."""
    if accepts(get_prompter, spec, engine):
        return False
    if accepts(get_prompter, None, None, None):
        return True
    raise PromptError(f"prompt_module {path}: get_prompter{inspect.signature(get_prompter)} must accept two "
                      "arguments, get_prompter(spec, engine), or gen_img's three, get_prompter(args, pipe, networks)")


def _lines(path: Path, items: Iterator[Any], negative: str, max_lines: int = MAX_LINES) -> Iterator[PromptLine]:
    """Convert the module's items to PromptLines named FILE:#N; errors name the item and the file.

    At most `max_lines` items are taken: asking for one more is an error naming prompts.max_module_lines.
    """
    count = 0
    for index in itertools.count(1):
        try:
            item = next(items)
        except StopIteration:
            break
        except PromptError:  # already one line (a gen_img prompter touching pipe or networks)
            raise
        except _MODULE_ERRORS as ex:
            raise PromptError(f"prompt_module {path}: get_prompter, making item #{index} "
                              f"({index - 1} yielded before), {_describe(ex, path)}") from ex
        if index > max_lines:
            _close(items)
            raise PromptError(f"prompt_module {path}: get_prompter yields more than {max_lines} items (an endless "
                              f"generator?); stop it sooner or raise prompts.max_module_lines=N")
        line = _to_line(path, index, item, negative)
        if line is not None:
            count += 1
            yield line
    if count == 0:
        raise PromptError(f"prompt_module {path}: get_prompter yielded no prompt lines; yield at least one string")


def _close(items: Iterator[Any]) -> None:
    """Close a generator cut short by the cap (its finally blocks run); what its code raises there is ignored."""
    close = getattr(items, "close", None)
    if callable(close):
        try:
            close()
        except _MODULE_ERRORS:
            pass


def _to_line(path: Path, index: int, item: Any, negative: str) -> PromptLine | None:
    """One item (str or dict) as a PromptLine, or None for a blank string."""
    origin = f"{path.name}:#{index}"
    if isinstance(item, str):
        return PromptLine(item.strip(), negative, origin) if item.strip() else None
    if not isinstance(item, dict):
        raise PromptError(f"prompt_module {path}: item #{index} is a {type(item).__name__}; "
                          "yield a str or a dict with 'prompt' (and optionally 'negative_prompt')")
    unknown = sorted(str(key) for key in item if key not in _DICT_KEYS)
    if unknown:
        raise PromptError(f"prompt_module {path}: item #{index} has unknown key(s) {', '.join(unknown)}; "
                          "valid keys: prompt, negative_prompt")
    text, item_negative = item.get("prompt"), item.get("negative_prompt", negative)
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"prompt_module {path}: item #{index} needs a non-empty string 'prompt', "
                          f"got {text!r}")
    if item_negative is None:
        item_negative = negative
    if not isinstance(item_negative, str):
        raise PromptError(f"prompt_module {path}: item #{index} 'negative_prompt' must be a string, "
                          f"got {type(item_negative).__name__}")
    return PromptLine(text.strip(), item_negative, origin)


def _describe(ex: BaseException, path: Path) -> str:
    """'raised ValueError: msg (in the prompt module's own code, line 12)' on one line; sys.exit(3) is
    'called sys.exit(3) (...)'."""
    where = "in the prompt module's own code"
    frames = [frame for frame in traceback.extract_tb(ex.__traceback__) if _same_file(frame.filename, path)]
    if frames:
        where += f", line {frames[-1].lineno}"
    if isinstance(ex, SystemExit):
        code = "" if ex.code is None else repr(ex.code)
        return f"called sys.exit({_one_line(code) if code else ''}) ({where}); raise an exception or return instead"
    return f"raised {type(ex).__name__}: {_one_line(str(ex))} ({where})"


def _same_file(filename: str, path: Path) -> bool:
    try:
        return Path(filename).resolve() == path.resolve()
    except OSError:
        return False


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"
