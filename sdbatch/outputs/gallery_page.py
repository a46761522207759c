"""index.html for a run or sweep directory: one self-contained page, no server, network or build step.

The page carries its data as JSON in a `<script type="application/json">` element, with `<`, `>`, `&` and the
two JavaScript line separators written as \\u escapes, so no text from a prompt or an image can close the
element or start markup; gallery.js builds the interactive view from that data with DOM text nodes only (never
innerHTML). Without JavaScript the page is the static list written here in <noscript> (which a browser running
scripts does not even parse: 1,000 items open faster), every text HTML-escaped. Paths are
relative and percent-encoded, so a directory can be moved or zipped and its page still opens from disk.
"""

from __future__ import annotations

import functools
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sdbatch.outputs.files import atomic_write_text

PAGE = "index.html"
RELOAD_SECONDS = 3  # a live run's page reloads itself this often
_PROMPT_CHARS = 160  # of each prompt in the static list


def write_page(directory: Path, data: dict[str, Any]) -> Path:
    """Write directory/index.html atomically (a reader never sees half a page)."""
    return atomic_write_text(Path(directory) / PAGE, render(data))


def render(data: dict[str, Any]) -> str:
    """The whole page: inline CSS and JavaScript, the data as escaped JSON, and a static list for no JavaScript."""
    title = f"sdbatch · {data['title']}"
    refresh = f'<noscript><meta http-equiv="refresh" content="{RELOAD_SECONDS}"></noscript>' if data["live"] else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="generator" content="sdbatch">
<link rel="icon" href="data:,">
{refresh}
<title>{html.escape(title)}</title>
<style>{_asset("gallery.css")}</style>
</head>
<body>
<header class="top"><h1>{html.escape(title)}</h1><p class="summary">{html.escape(summary(data))}</p></header>
<main id="app">
<noscript><ol class="static">
{"".join(_static_item(item) for item in data["items"])}
</ol></noscript>
</main>
<script type="application/json" id="gallery-data">{embed_json(data)}</script>
<script>{_asset("gallery.js")}</script>
</body>
</html>
"""


def embed_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: nothing in it can end the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def summary(data: dict[str, Any]) -> str:
    """One line under the title: counts, failures, and whether the run is still going."""
    images = sum(1 for item in data["items"] if item.get("file"))
    parts = [f"{images} image{'s' if images != 1 else ''}"]
    if data["kind"] == "sweep":
        parts.insert(0, f"{data['jobs']} job{'s' if data['jobs'] != 1 else ''}")
        if data["failed"]:
            parts.append(f"{data['failed']} failed")
    if data["dims"]:
        parts.append("axes: " + ", ".join(dim["key"] for dim in data["dims"]))
    parts.append("running, updates every few seconds" if data["live"] else f"written {data['generated']}")
    return " · ".join(parts)


def url(path: str) -> str:
    """A relative path as an escaped href/src value (spaces, '#', '?' and '%' in file names percent-encoded)."""
    return html.escape(quote(path), quote=True)


def _static_item(item: dict[str, Any]) -> str:
    if not item.get("file"):
        text = f"job {item.get('job')} {item['status']}: {item.get('error')}"
        return f'<li class="failed">{html.escape(text)}</li>\n'
    params = item["params"]
    prompt = str(params.get("prompt") or "")
    if len(prompt) > _PROMPT_CHARS:
        prompt = prompt[:_PROMPT_CHARS] + "…"
    caption = f"seed {params.get('seed')} · {prompt}"
    return (f'<li><a href="{url(item["file"])}"><img src="{url(item["thumb"])}" loading="lazy" alt=""></a>'
            f"<span>{html.escape(caption)}</span></li>\n")


@functools.cache  # read once per process: a live run rewrites its page every few seconds
def _asset(name: str) -> str:
    """gallery.css / gallery.js, shipped beside this module; `</` never occurs in them (checked by the tests)."""
    return resources.files("sdbatch.outputs").joinpath(name).read_text(encoding="utf-8")
