"""`tlray train SPEC`: fine-tune the spec's model on Ray and publish it to output.uri.

The same spec and data always map to the same run folder, so running the command again resumes from the
newest complete checkpoint, and a finished run is never rewritten (tlray.artifacts.export).
"""

from __future__ import annotations

from collections.abc import Sequence

from tlray.artifacts.export import PublishedRun, publish, run_uri
from tlray.artifacts.run_report import write_run_report
from tlray.console import Laps
from tlray.flows import steps, tracking
from tlray.spec import load_spec
from tlray.training.trainer import fit, load_selected_checkpoint


def train(spec_file: str, overrides: Sequence[str] = (), if_data_changed: bool = False) -> PublishedRun | None:
    """Train, publish the selected epoch, offer it to the champion gate. None when `if_data_changed` finds
    the champion trained on exactly this data."""
    spec = load_spec(spec_file, overrides)  # 1. parse and validate the whole spec
    laps = Laps()  # the run's timings: each step's seconds
    index = steps.index_data(spec)  # 2. the data: listed and split
    if if_data_changed and steps.champion_has_this_data(spec, index):
        return None
    laps.lap("index")
    steps.check_destination(spec, index)  # 3. the output
    spec, model = steps.warm_start(spec, index)  # 4. the weights
    laps.lap("weights")
    run = run_uri(spec, index)
    steps.join_cluster(spec, index, run)  # 5. the cluster
    laps.lap("cluster")
    print(f"[tlray] run {run.rsplit('/', 1)[-1]}: checkpoints and model under {run}")
    plan = tracking.start(steps.run_plan(spec, index, run, model), "train")  # 6. the run plan, its MLflow run
    laps.lap("plan")
    with tracking.ended_if_interrupted(plan):
        fit(plan)  # 7. fine-tune: one worker in a Ray actor, several on Ray Train; data streamed by Ray Data
    print(f"[tlray] trained in {laps.lap('fit')['fit']:.1f} s", flush=True)
    # 8. publish the best epoch of every sealed one: export, describe, MANIFEST last
    state, history = load_selected_checkpoint(plan.checkpoints_uri, spec.dataset.endpoint_url, spec.train.select_metric)
    note_epoch_time(laps, history)
    published = publish(plan, model, state, history=history, timings=laps)
    decision = steps.gate_champion(spec, run, plan.data)  # 9. the champion gate
    laps.lap("gate")
    page = write_run_report(run, plan.endpoint_url)  # report/ is not in the manifest: `tlray report` redraws it
    tracking.record_published(plan, decision, laps.seconds)  # ... and MLflow's registry follows it
    print(f"[tlray] model published to {published.uri}/model")  # 10. what was published
    print(f"[tlray] val_accuracy {published.metrics['val_accuracy']:.4f} after {published.metrics['epoch']} epochs")
    print(f"[tlray] report: {page}")
    print(f"[tlray] {laps.line()}", flush=True)
    return published


def note_epoch_time(laps: Laps, history: list[dict]) -> None:
    """The part of the fit that the epochs themselves took (every epoch of the run, a resumed one's earlier
    epochs too), and of that the frozen-prefix cache's feature pass; the rest of the fit is workers starting,
    checkpoints and Ray."""
    laps.note("epochs", sum(epoch["epoch_seconds"] for epoch in history))
    if any("feature_pass_seconds" in epoch for epoch in history):
        laps.note("feature_pass", sum(epoch.get("feature_pass_seconds", 0.0) for epoch in history))
