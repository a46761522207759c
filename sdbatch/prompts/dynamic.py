"""Dynamic prompts: `{a|b}` groups and `__name__` wildcards picked per image seed; `{e$$...}` enumerated.

Syntax (the reference tool's, without its bugs):
  {a|b|c}              one alternative
  {2$$a|b|c}           2 distinct alternatives, in the order drawn, joined by ", "
  {1-2$$a|b|c}         a random count in the range (reversed bounds swapped, clamped to [0, n])
  {2$$ and $$a|b|c}    a custom joiner; header fields, each optional, come in this order: e, count, joiner
  {e$$...}             enumeration: every combination becomes its own prompt (`enumerate_variants`)
  \\{ \\} \\|             a literal brace or pipe (other backslashes, e.g. A1111's \\(, stay as written)
  __name__             one line of name.txt in the wildcards directory; __colors/warm__ → colors/warm.txt
  {2$$__name__}        a group whose only alternative is a wildcard draws from the wildcard's lines
Alternatives may be empty (`{big |}`). `{}`, unbalanced braces and a count field that is not N or N-M
are errors. Groups nest: an alternative may hold groups and wildcards, and is expanded to text before it
is joined into the outer result (innermost first, as in the reference), so an inner `|` or joiner never
splits the outer group; alternatives that are not chosen are not expanded.

Choices come from `random.Random(seed)` with the IMAGE's seed, so each image's prompt is tied to its seed.
Wildcard files are checked before anything is drawn (missing file, unreadable line, a cycle such as
a → b → a, more than MAX_DEPTH levels of groups and wildcards), so errors never depend on the seed.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sdbatch.errors import PromptError
from sdbatch.prompts.sources import clean_text

MAX_VARIANTS = 10_000  # enumerate_variants refuses to produce more prompts than this
MAX_DEPTH = 32  # nesting levels of groups and wildcards together

_WILDCARD = re.compile(r"__([^\W_][\w\-./]*?)__")
_HEADER_FIELD = re.compile(r"((?:[^|{}\\$]|\$(?!\$))*)\$\$")
_COUNT = re.compile(r"\s*([0-9]{1,6})\s*(?:-\s*([0-9]{1,6})\s*)?")
_COUNT_LIKE = re.compile(r"[\s0-9-]*[0-9][\s0-9-]*")
_ESCAPABLE = frozenset("{}|")
_DYNAMIC = re.compile(r"[{}]|\\\||" + _WILDCARD.pattern)


@dataclass(frozen=True, slots=True)
class _Text:
    text: str  # literal, escapes resolved


@dataclass(frozen=True, slots=True)
class _Wildcard:
    name: str


@dataclass(frozen=True, slots=True)
class _Group:
    enumerate: bool
    lo: int  # count range as written, lo <= hi; clamped to the number of alternatives when used
    hi: int
    sep: str | None  # None: not written (", ")
    header: str  # the header as written ("2$$ and $$"), to write random groups back out
    alternatives: tuple[tuple[_Node, ...], ...]


_Node = _Text | _Wildcard | _Group


class Wildcards:
    """The wildcards directory: `__name__` → the lines of name.txt; files are read once per instance."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._lines: dict[str, tuple[tuple[int, str], ...]] = {}
        self._parsed: dict[str, tuple[tuple[_Node, ...], ...]] = {}
        self._depths: dict[str, int] = {}  # levels below a checked wildcard (no cycle, all files there)

    def __repr__(self) -> str:
        return f"Wildcards({self.directory})"

    def options(self, name: str) -> list[str]:
        """The lines of `name`.txt, stripped; blank lines and lines starting with '#' skipped."""
        return [text for _, text in self._numbered(name)]

    def _numbered(self, name: str) -> tuple[tuple[int, str], ...]:
        if name not in self._lines:
            self._lines[name] = _read_wildcard(self.directory, name)
        return self._lines[name]

    def _parsed_lines(self, name: str) -> tuple[tuple[_Node, ...], ...]:
        if name not in self._parsed:
            lines = []
            for number, line in self._numbered(name):
                try:
                    lines.append(_parse(line))
                except PromptError as ex:
                    raise PromptError(f"wildcard __{name}__ ({name}.txt:{number}): {ex}") from None
            self._parsed[name] = tuple(lines)
        return self._parsed[name]


def _read_wildcard(directory: Path | None, name: str) -> tuple[tuple[int, str], ...]:
    """(line number, text) of each option line of directory/name.txt; PromptError naming name and directory."""
    where = f"wildcard __{name}__"
    if directory is None:
        raise PromptError(f"{where} is used but no wildcards directory is set")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise PromptError(f"{where}: a wildcard name is a path below {directory} without '.', '..' or '//'")
    if not directory.is_dir():
        what = "is a file, not a folder" if directory.exists() else "does not exist"
        raise PromptError(f"{where}: the wildcards directory {directory} {what} <prompts.wildcards_dir>")
    path = directory.joinpath(*parts[:-1], parts[-1] + ".txt")
    if path.is_dir():
        raise PromptError(f"{where}: {path} is a folder, not a text file; name a file, e.g. __{name}/NAME__")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptError(f"{where}: no file {name}.txt in the wildcards directory {directory}"
                          f"{_suggest(directory, name)}") from None
    except (OSError, UnicodeDecodeError) as ex:
        raise PromptError(f"{where}: {path} cannot be read as UTF-8 text: {ex}") from None
    lines = tuple((number, clean_text(line.strip(), f"wildcard __{name}__ ({name}.txt:{number})"))
                  for number, line in enumerate(text.splitlines(), start=1)
                  if line.strip() and not line.strip().startswith("#"))
    if not lines:
        raise PromptError(f"{where}: {path} has no lines (only blanks or '#' comments)")
    return lines


def _suggest(directory: Path, name: str) -> str:
    files = itertools.islice(directory.rglob("*.txt"), 1000)
    names = [path.relative_to(directory).with_suffix("").as_posix() for path in files]
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean __{close[0]}__?" if close else ""


def has_dynamic(text: str) -> bool:
    """Whether `expand` may return something other than `text`: a group, a wildcard or a \\{ \\} \\| escape.

    Cheap and never raises (an unbalanced brace counts: `expand` reports it).
    """
    return _DYNAMIC.search(text) is not None


def expand(text: str, seed: int, wildcards: Wildcards | None = None, *, origin: str | None = None) -> str:
    """The prompt of the image with this seed: every group and wildcard resolved with random.Random(seed).

    An enumeration group still present (the caller skipped `enumerate_variants`, or it sits in a wildcard
    line) is drawn like a plain group. `origin` ("prompts.txt:4") prefixes error messages.
    """
    wildcards = Wildcards(None) if wildcards is None else wildcards
    with _at(origin):
        nodes = _parse(text)
        _check(nodes, wildcards, 0, ())
        return _expand_seq(nodes, random.Random(seed), wildcards)


def enumerate_variants(text: str, wildcards: Wildcards | None = None, *, origin: str | None = None) -> list[str]:
    """Every prompt the line's `{e$$...}` groups stand for (their product, first group slowest).

    `{e$$2$$A|B|C} x` → ["A, B x", "A, C x", "B, C x"]. Each enumeration group anywhere in the line counts,
    also one nested in a plain group or in another enumeration group (`{e$$A|{e$$B|C}}` → A, B, C;
    `{A|{e$$B|C}}` → "{A|B}", "{A|C}"). `{e$$__name__}` enumerates the lines of a wildcard. Plain groups and
    other wildcards are kept, as source text for `expand`. A line without enumeration comes back unchanged.
    More than MAX_VARIANTS variants → PromptError.
    """
    wildcards = Wildcards(None) if wildcards is None else wildcards
    with _at(origin):
        nodes = _parse(text)
        _check(nodes, wildcards, 0, ())
        if not _has_enumeration(nodes):
            return [text]
        return _seq_variants(nodes, False, wildcards)


@contextlib.contextmanager
def _at(origin: str | None) -> Iterator[None]:
    try:
        yield
    except PromptError as ex:
        if not origin:
            raise
        raise PromptError(f"{origin}: {ex}") from None


# ---- parsing --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[_Node, ...]:
    nodes, end = _parse_seq(text, 0, 0)
    if end < len(text):
        raise PromptError(f"unmatched '}}' at column {end + 1}; write \\}} for a literal brace")
    return nodes


def _parse_seq(text: str, i: int, depth: int) -> tuple[tuple[_Node, ...], int]:
    """Nodes from text[i:] up to the end, a '}' or (inside a group) a '|'; returns them and where it stopped."""
    nodes: list[_Node] = []
    buffer: list[str] = []
    while i < len(text):
        char = text[i]
        if char == "\\" and text[i + 1 : i + 2] in _ESCAPABLE:
            buffer.append(text[i + 1])
            i += 2
        elif char == "}" or (char == "|" and depth):
            break
        elif char == "{" or (char == "_" and _WILDCARD.match(text, i)):
            if buffer:
                nodes.append(_Text("".join(buffer)))
                buffer.clear()
            node, i = _parse_group(text, i, depth + 1) if char == "{" else _parse_wildcard(text, i)
            nodes.append(node)
        else:
            buffer.append(char)
            i += 1
    if buffer:
        nodes.append(_Text("".join(buffer)))
    return tuple(nodes), i


def _parse_wildcard(text: str, i: int) -> tuple[_Wildcard, int]:
    match = _WILDCARD.match(text, i)
    assert match is not None  # the caller matched it
    return _Wildcard(match[1]), match.end()


def _parse_group(text: str, start: int, depth: int) -> tuple[_Group, int]:
    """The group whose '{' is at text[start]; returns it and the index after its '}'."""
    if depth > MAX_DEPTH:
        raise PromptError(f"{{...}} groups nested more than {MAX_DEPTH} deep (column {start + 1})")
    enum, count, sep, i = _parse_header(text, start + 1)
    header_end = i
    alternatives = []
    while True:
        alternative, i = _parse_seq(text, i, depth)
        alternatives.append(alternative)
        if i >= len(text):
            raise PromptError(f"unclosed '{{' at column {start + 1}; "
                              "close it with '}' or write \\{ for a literal brace")
        i += 1
        if text[i - 1] == "}":
            break
    if alternatives == [()]:
        raise PromptError(f"empty group {text[start:i]!r} at column {start + 1}; write \\{{\\}} for literal braces")
    lo, hi = sorted(count)
    return _Group(enum, lo, hi, sep, text[start + 1 : header_end], tuple(alternatives)), i


def _parse_header(text: str, i: int) -> tuple[bool, tuple[int, int], str | None, int]:
    """The optional `e$$`, `N$$`/`N-M$$` and joiner fields at text[i:]: (enumerate, count, joiner, end)."""
    enum, count, sep = False, None, None
    while sep is None and (match := _HEADER_FIELD.match(text, i)):
        field = match[1]
        if field in ("e", "E") and not enum and count is None:
            enum = True
        elif count is None and (number := _COUNT.fullmatch(field)):
            count = (int(number[1]), int(number[2] or number[1]))
        elif count is None and _COUNT_LIKE.fullmatch(field):
            raise PromptError(f"bad count {field!r} at column {i + 1}; "
                              "write N or N-M, e.g. {2$$a|b|c} or {1-2$$a|b|c}")
        else:
            sep = field
        i = match.end()
    return enum, count or (1, 1), sep, i


# ---- checking and expanding ----------------------------------------------------------------------


def _check(nodes: tuple[_Node, ...], wildcards: Wildcards, level: int, stack: tuple[str, ...]) -> int:
    """The deepest level of groups and wildcards in `nodes`, which sit at `level`; reads every wildcard."""
    if level > MAX_DEPTH:
        raise PromptError(f"groups and wildcards nested more than {MAX_DEPTH} levels deep")
    deepest = level
    for node in nodes:
        if isinstance(node, _Group):
            for alternative in node.alternatives:
                deepest = max(deepest, _check(alternative, wildcards, level + 1, stack))
        elif isinstance(node, _Wildcard):
            deepest = max(deepest, _check_wildcard(node.name, wildcards, level + 1, stack))
    return deepest


def _check_wildcard(name: str, wildcards: Wildcards, level: int, stack: tuple[str, ...]) -> int:
    if name in stack:
        cycle = " -> ".join(f"__{n}__" for n in (*stack[stack.index(name) :], name))
        raise PromptError(f"wildcard cycle {cycle}; a wildcard must not use itself, directly or through others")
    if name not in wildcards._depths:
        lines = wildcards._parsed_lines(name)
        deepest = max(_check(line, wildcards, level, (*stack, name)) for line in lines)
        wildcards._depths[name] = deepest - level
    if level + wildcards._depths[name] > MAX_DEPTH:
        raise PromptError(f"groups and wildcards nested more than {MAX_DEPTH} levels deep (in __{name}__)")
    return level + wildcards._depths[name]


def _alternatives(group: _Group, wildcards: Wildcards) -> tuple[tuple[_Node, ...], ...]:
    """The group's alternatives; a sole wildcard alternative (`{2$$__name__}`) stands for its lines."""
    if len(group.alternatives) == 1:
        core = [n for n in group.alternatives[0] if not (isinstance(n, _Text) and not n.text.strip())]
        if len(core) == 1 and isinstance(core[0], _Wildcard):
            return wildcards._parsed_lines(core[0].name)
    return group.alternatives


def _counts(group: _Group, n: int) -> tuple[int, int]:
    return min(group.lo, n), min(group.hi, n)


def _joiner(group: _Group) -> str:
    return ", " if group.sep is None else group.sep


def _expand_seq(nodes: tuple[_Node, ...], rng: random.Random, wildcards: Wildcards) -> str:
    return "".join(_expand_node(node, rng, wildcards) for node in nodes)


def _expand_node(node: _Node, rng: random.Random, wildcards: Wildcards) -> str:
    if isinstance(node, _Text):
        return node.text
    if isinstance(node, _Wildcard):
        lines = wildcards._parsed_lines(node.name)
        return _expand_seq(lines[rng.randrange(len(lines))], rng, wildcards)
    alternatives = _alternatives(node, wildcards)
    picks = rng.sample(range(len(alternatives)), rng.randint(*_counts(node, len(alternatives))))
    return _joiner(node).join(_expand_seq(alternatives[j], rng, wildcards) for j in picks)


# ---- enumeration ---------------------------------------------------------------------------------


def _has_enumeration(nodes: tuple[_Node, ...]) -> bool:
    return any(isinstance(node, _Group) and (node.enumerate or any(map(_has_enumeration, node.alternatives)))
               for node in nodes)


def _capped(items: Iterable[str]) -> list[str]:
    variants = list(itertools.islice(items, MAX_VARIANTS + 1))
    if len(variants) > MAX_VARIANTS:
        raise PromptError(f"more than {MAX_VARIANTS} prompt variants from {{e$$...}} groups; "
                          "enumerate fewer groups or smaller counts")
    return variants


def _seq_variants(nodes: tuple[_Node, ...], in_group: bool, wildcards: Wildcards) -> list[str]:
    """Source text of every variant of `nodes`; `in_group`: they sit inside a plain group (escape '|')."""
    parts = [_node_variants(node, in_group, wildcards) for node in nodes]
    return _capped("".join(combination) for combination in itertools.product(*parts))


def _node_variants(node: _Node, in_group: bool, wildcards: Wildcards) -> list[str]:
    if isinstance(node, _Text):
        return [_escape(node.text, in_group)]
    if isinstance(node, _Wildcard):
        return [f"__{node.name}__"]
    if not node.enumerate:
        alternatives = [_seq_variants(alternative, True, wildcards) for alternative in node.alternatives]
        return _capped(_group_source(node, chosen) for chosen in itertools.product(*alternatives))
    alternatives = [_seq_variants(alt, in_group, wildcards) for alt in _alternatives(node, wildcards)]
    lo, hi = _counts(node, len(alternatives))
    return _capped(_joiner(node).join(pick) for count in range(lo, hi + 1)
                   for combination in itertools.combinations(alternatives, count)
                   for pick in itertools.product(*combination))


def _escape(text: str, in_group: bool) -> str:
    text = text.replace("{", "\\{").replace("}", "\\}")
    return text.replace("|", "\\|") if in_group else text


def _group_source(group: _Group, alternatives: tuple[str, ...]) -> str:
    """A plain group written back with enumerated alternatives; a full header keeps a '$$' in them literal."""
    if alternatives == ("",):
        return ""
    header = group.header
    if group.sep is None and "$$" in alternatives[0]:
        header = f"{group.lo}-{group.hi}$${_joiner(group)}$$"
    return "{" + header + "|".join(alternatives) + "}"
