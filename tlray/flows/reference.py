"""`tlray reference`: the job spec reference (Markdown), generated from the spec's field descriptions."""

from __future__ import annotations

from tlray.spec import reference_markdown


def reference() -> None:
    print(reference_markdown(), end="")
