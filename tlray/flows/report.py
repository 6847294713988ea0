"""`tlray report RUN_URI`: redraw the report page of a run, a search or the demo from its stored results.

Which page a folder gets follows from what it holds: a search's tune_results.json, the demo's results.json, or a
published run's metadata.json (a search's folder holds one too: its best trial's, so a search is asked first).
"""

from __future__ import annotations

from tlray.artifacts.demo_report import RESULTS, write_demo_page
from tlray.artifacts.run_report import write_run_report
from tlray.artifacts.search_report import write_search_report
from tlray.errors import UserError
from tlray.io import storage

PAGES = (("tune_results.json", write_search_report), (RESULTS, write_demo_page), ("metadata.json", write_run_report))


def report(run_uri: str, endpoint_url: str | None = None) -> None:
    print(f"[tlray] report: {draw_report(storage.absolute_uri(run_uri.rstrip('/')), endpoint_url)}")


def draw_report(run: str, endpoint_url: str | None = None) -> str:
    for results, draw in PAGES:
        if storage.exists(storage.join(run, results), endpoint_url):
            return draw(run, endpoint_url)
    raise UserError(
        f"RUN_URI: {run} holds none of {', '.join(name for name, _ in PAGES)}; "
        "give the folder that `tlray train`, `tlray tune` or `tlray demo` printed"
    )
