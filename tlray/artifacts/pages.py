"""The HTML of tlray's report pages: one stylesheet, tables, figures, and no JavaScript.

Every report is a folder, `report/`, beside the results it draws: `index.html`, `style.css` and its PNGs, with
relative links only, so the page opens from a file, from a copied folder, or from an S3 static website (the
files are uploaded with their content types) alike. A report is never in a run's manifest: redrawing it
(`tlray report`) never unseals the run.
"""

from __future__ import annotations

import html
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tlray.errors import UserError
from tlray.io import storage

REPORT = "report"
STYLESHEET = """\
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.marked td { background: #fff4c2; font-weight: bold; }
figure { margin: 1.5em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; }
.promoted { color: #1a7f37; } .kept { color: #9a6700; }
"""


class Html(str):
    """Markup that a table cell keeps as it is (a link); every other cell is escaped."""


def link(href: str, text: str) -> Html:
    return Html(f'<a href="{html.escape(href)}">{html.escape(text)}</a>')


NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(/\d+)?")  # 0.8390, 11,024,138, 8/8: right-aligned


def cell(value: object) -> str:
    if isinstance(value, Html):
        return f"<td>{value}</td>"
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f'<td class="n">{text}</td>' if NUMBER.fullmatch(text) else f"<td>{html.escape(text)}</td>"


def table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[object]], marked: Iterable[int] = ()) -> str:
    """A table with one header row; the rows at the 0-based indices in `marked` stand out (the published epoch)."""
    marked = set(marked)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    opening = {True: '<tr class="marked">', False: "<tr>"}
    body = "\n".join(opening[i in marked] + "".join(cell(v) for v in row) + "</tr>" for i, row in enumerate(rows))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def figure(src: str, caption: str, element_id: str | None = None) -> str:
    anchor = f' id="{element_id}"' if element_id else ""
    alt = html.escape(caption)
    return f'<figure{anchor}><img src="{html.escape(src)}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="style.css"></head>
<body>
<h1>{html.escape(title)}</h1>
{body}
<p class="note">Drawn by tlray from the run's stored results; <code>tlray report RUN_URI</code> draws it again.</p>
</body></html>
"""


def file_name(text: str) -> str:
    """A trial's name as a file name and an HTML id: letters, digits, `-` and `_` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)


def read_results(base: str, name: str, endpoint_url: str | None, command: str) -> dict:
    """The stored results a page is drawn from; their absence is bad input (`tlray report` on the wrong folder)."""
    try:
        return storage.read_json(storage.join(base, name), endpoint_url)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"RUN_URI: no {name} in {base} ({exc}); give the folder `tlray {command}` printed") from None


def read_if_stored(base: str, name: str, endpoint_url: str | None) -> dict | None:
    """Results a page shows when they are there (a run of an older tlray, an unfinished search has none)."""
    try:
        return storage.read_json(storage.join(base, name), endpoint_url)
    except (FileNotFoundError, OSError):
        return None


def write_report(base: str, draw: Callable[[Path], str], endpoint_url: str | None = None) -> str:
    """`draw(folder)` writes its PNGs into a fresh folder and returns the page's HTML; the page, the stylesheet
    and the PNGs go to `<base>/report/`. Returns the index.html location."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "index.html").write_text(draw(folder), encoding="utf-8")
        (folder / "style.css").write_text(STYLESHEET, encoding="utf-8")
        storage.upload_site(folder, storage.join(base, REPORT), endpoint_url)
    return storage.join(base, REPORT, "index.html")
