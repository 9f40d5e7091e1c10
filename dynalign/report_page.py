"""The HTML page of ``dynalign report``: sections, text, tables and matplotlib figures (Agg, saved
as PNGs beside it) collected in order, then ``index.html`` written in one piece. Every file is
written atomically (``dynalign.files``): a reader never sees half a page or half an image."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from dynalign.files import atomic_path, atomic_write_text


def save_png(figure, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG at ``path``, atomically."""
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=dpi, format="png")


def new_figure(width: float = 6.4, height: float = 3.6, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


class Page:
    """Collects sections (headings, text, tables, figures) and writes index.html + PNGs."""

    def __init__(self, out: Path):
        self.out = out
        self.parts: list[str] = []
        self.images: list[str] = []
        self.toc: list[tuple[str, str]] = []

    def section(self, title: str) -> None:
        anchor = "s" + str(len(self.toc))
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def text(self, text: str, css: str = "") -> None:
        self.parts.append(f'<p class="{css}">{html.escape(text)}</p>' if css else f"<p>{html.escape(text)}</p>")

    def figure(self, name: str, draw: Callable, caption: str = "", **size) -> None:
        figure, axes = new_figure(**size)
        draw(figure, axes)
        save_png(figure, self.out / name, dpi=100)
        self.add_image(name, caption)

    def add_image(self, name: str, caption: str = "") -> None:
        self.images.append(name)
        self.parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption or name)}">'
                          + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "") + "</figure>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence], css: str = "") -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.parts.append(f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>'
                          f'<tbody>{body}</tbody></table></div>')

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def write(self, title: str) -> Path:
        toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self.toc)
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1280px; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; margin: .8em 0; font-size: .9em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; white-space: nowrap; }}
.scroll {{ overflow-x: auto; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: .5em; vertical-align: top; }} img {{ max-width: 100%; }}
figcaption {{ font-size: .85em; color: #555; max-width: 640px; }}
.warn {{ background: #fff3cd; padding: .5em; border-left: 4px solid #e0a800; }}
.muted {{ color: #777; }} pre {{ background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .8em; }}
</style></head>
<body data-images="{len(self.images)}">
<h1>{html.escape(title)}</h1>
<ul>{toc}</ul>
{chr(10).join(self.parts)}
<script>
// Set when the page has loaded: how many images decoded (naturalWidth > 0) out of all of them.
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
}});
</script>
</body></html>
"""
        path = self.out / "index.html"
        atomic_write_text(path, page)
        return path


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)
