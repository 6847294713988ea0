"""`tlray tune SPEC`: search learning rate and freeze depth, or random init (the spec's tune section), with Ray
Tune, publish the best trial's model exactly as `tlray train` would, and write the search's report.

It reads like `tlray train` step for step; only 7 (a search instead of one run) and 8 (the search's results,
confusion matrix and report beside the published model) differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tlray.artifacts.export import PublishedRun, publish, published_run, run_uri
from tlray.artifacts.manifest import is_sealed, write_manifest
from tlray.artifacts.search_report import write_search_report
from tlray.console import Laps
from tlray.errors import UserError
from tlray.flows import steps, tracking
from tlray.plan import RunPlan
from tlray.spec import RANDOM_INIT, load_spec
from tlray.training.search import (
    best_trial,
    best_trial_spec,
    check_searchable,
    raise_if_interrupted,
    raise_if_no_trial_finished,
    result_rows,
    results_table,
    run_search,
    write_results,
)
from tlray.training.trainer import load_selected_checkpoint


def tune(spec_file: str, overrides: Sequence[str] = (), if_data_changed: bool = False) -> PublishedRun | None:
    """Search, publish the best trial, offer it to the champion gate. None when `if_data_changed` finds the
    champion trained on exactly this data."""
    spec = load_spec(spec_file, overrides)  # 1. parse and validate the whole spec
    if spec.tune is None:
        raise UserError(
            "tune: the spec has no tune section; add one (see jobs/digits-new-domain.yaml) or use `tlray train`"
        )
    laps = Laps()  # the run's timings: each step's seconds
    index = steps.index_data(spec)  # 2. the data: listed and split
    if if_data_changed and steps.champion_has_this_data(spec, index):
        return None
    laps.lap("index")
    steps.check_destination(spec, index)  # 3. the output
    spec, model = steps.warm_start(spec, index)  # 4. the weights
    check_searchable(spec, index)
    laps.lap("weights")
    run = run_uri(spec, index, "tune")
    steps.join_cluster(spec, index, run)  # 5. the cluster
    laps.lap("cluster")
    print(f"[tlray] search {run.rsplit('/', 1)[-1]}: trials, results, report and best model under {run}")
    plan = tracking.start(steps.run_plan(spec, index, run, model), "tune")  # 6. the run plan, each trial's from it
    laps.lap("plan")
    with tracking.ended_if_interrupted(plan):
        grid = run_search(plan)  # 7. a trial per point, ASHA stops weak ones
        raise_if_interrupted(grid, spec)  # Ctrl-C: nothing is published, the same command resumes
        raise_if_no_trial_finished(grid)
    laps.lap("search")
    rows = result_rows(grid, spec)
    print(results_table(rows, spec))
    best = best_trial(rows)
    best_plan = plan.for_best_trial(best_trial_spec(spec, best), model, best["trial"])
    published = publish_best_trial(plan, best_plan, model, rows, best, laps)  # 8. publish the best trial, and report
    decision = steps.gate_champion(best_plan.spec, run, plan.data)  # 9. the champion gate
    laps.lap("gate")
    page = write_search_report(run, plan.endpoint_url)  # report/ is not in the manifest: `tlray report` redraws it
    tracking.record_search(plan, rows, best)  # the parent MLflow run: best trial, results table, report
    tracking.record_published(plan, decision, laps.seconds)  # ... and MLflow's registry follows it
    print(  # 10. what was published
        f"[tlray] best trial {best['trial']}: lr {best['lr']:.3g}, {choice_name(best['freeze_depth'])}, "
        f"{spec.tune.metric} {best['metric']:.4f}"
    )
    print(f"[tlray] model published to {published.uri}/model")
    print(f"[tlray] report: {page}")
    print(f"[tlray] {laps.line()}", flush=True)
    return published


def choice_name(choice) -> str:
    return "random init" if choice == RANDOM_INIT else f"freeze_depth {choice}"


def publish_best_trial(
    plan: RunPlan, best_plan: RunPlan, model: torch.nn.Module, rows: list[dict], best: dict, timings: Laps
) -> PublishedRun:
    """The best trial's selected epoch, published as `tlray train` would (its validation confusion matrix too), with
    the search's results beside it. A finished search, run again, keeps its published files as they are."""
    spec, run, endpoint = plan.spec, plan.run_uri, plan.endpoint_url
    if is_sealed(run, endpoint):
        return published_run(run, endpoint)
    write_results(rows, run, spec)
    state, history = load_selected_checkpoint(best_plan.checkpoints_uri, endpoint, spec.train.select_metric)
    hyperparameters = {"lr": best["lr"], "freeze_depth": best_plan.freeze.depth, "trial": best["trial"]}
    published = publish(best_plan, model, state, hyperparameters, history, seal=False, timings=timings)
    write_manifest(run, endpoint)  # last: from now on the run is complete
    return published
