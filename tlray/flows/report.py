"""`tlray report RUN_URI`: redraw a search's report from its stored results (tlray.artifacts.search_report)."""

from __future__ import annotations

from tlray.artifacts.search_report import write_search_report


def report(run_uri: str, endpoint_url: str | None = None) -> None:
    print(f"[tlray] report: {write_search_report(run_uri.rstrip('/'), endpoint_url)}")
