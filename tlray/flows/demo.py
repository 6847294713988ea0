"""`tlray demo`: what transfer learning buys, shown on real scans in minutes on a laptop's CPUs.

1. images: scikit-learn's digits as image folders (tlray.data.demo_data): two sources, two few-shot targets;
2. sources: `jobs/digits-pretrain.yaml` (ten digits) and `jobs/digits-pretrain-0-4.yaml` train a ResNet-18
   from random init, exactly as `tlray train` does; each published state_dict is a target's pretrained weights;
3. every target (`jobs/digits-new-domain.yaml`, `jobs/digits-new-classes.yaml`) in the seed's three modes:
   random init, partial freeze at several depths (0 = full fine-tune), feature extractor;
4. `tlray tune` over lr x (random init, freeze depths) on every target;
5. one table on the console, table.md and results.json, and a report page: report/index.html with its charts.

Each job prints one line here; their epochs and Ray's output go to the demo's log file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tlray import archs, console
from tlray.artifacts.demo_report import HEADER, RESULTS, columns, write_demo_page
from tlray.artifacts.export import PublishedRun
from tlray.data import demo_data
from tlray.errors import UserError
from tlray.flows.train import train
from tlray.flows.tune import tune
from tlray.io import storage
from tlray.spec import JobSpec, load_spec


@dataclass(frozen=True)
class Target:
    name: str  # as in the table
    source_spec: str  # jobs/<...>.yaml: the source task
    spec: str  # jobs/<...>.yaml: the target task (its tune section is the search)
    folder: str  # DemoFolders field of its images
    source_folder: str


TARGETS = (
    Target("new domain", "digits-pretrain", "digits-new-domain", "new_domain", "source_10"),
    Target("new classes", "digits-pretrain-0-4", "digits-new-classes", "new_classes", "source_0_4"),
)


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo's jobs share, fixed before the first one starts."""

    jobs: Path  # the folder of the specs
    data: Path  # where the image folders are written
    out: Path  # the demo's report and log
    k: int
    seed: int
    quick: bool
    s3: str | None  # s3://bucket of the loopback store, with --s3
    endpoint_url: str | None


@dataclass(frozen=True)
class Row:
    target: str
    mode: str  # "random init", "partial", "feature extractor", "tune"
    freeze_depth: int
    trainable: int
    val_accuracy: float
    train_seconds: float  # the epochs' own time: feature pass, training, validation
    wall_seconds: float  # the whole job: workers starting, checkpoints, publishing
    run: str
    lr: float
    curve: list[float]  # val_accuracy per epoch
    random_init: bool = False  # the search's row: its best trial trained from random init (tune.freeze_depth random)


def demo(k: int, seed: int, s3: bool, quick: bool, jobs: str = "jobs", data: str = "data") -> list[Row]:
    """Every job, one line each on the console; then the table and the report. With `s3`, all of it through
    a loopback S3 server that lives as long as the demo."""
    plan = demo_plan(k, seed, quick, jobs, data)
    with contextlib.ExitStack() as stack:
        if s3:
            endpoint = stack.enter_context(loopback_s3())
            plan = dataclasses.replace(plan, s3=f"s3://{DEMO_BUCKET}", endpoint_url=endpoint)
        started = time.perf_counter()
        folders = demo_data.write_demo_folders(plan.data, plan.k, plan.seed)  # 1. images
        console.say(
            f"digits: {plan.k} labelled images per class in each target (seed {plan.seed}); data in {plan.data}"
        )
        log = console.log_to(plan.out / console.LOG_FILE, pin=True)
        console.show_worker_lines(False)
        console.start_ray(log)
        rows: list[Row] = []
        for target in TARGETS[:QUICK_TARGETS] if plan.quick else TARGETS:
            images = upload(plan, getattr(folders, target.folder))
            source_images = upload(plan, getattr(folders, target.source_folder))
            weights = train_source(plan, target, source_images)  # 2. the source task
            for overrides in mode_overrides(plan, target, weights):  # 3. the three modes
                rows.append(run_row(plan, target, images, overrides))
            rows.append(run_search(plan, target, images, weights))  # 4. tune
        report = write_demo_report(plan, rows)  # 5. table and report
        print(table(rows))
        console.say(f"report: {report}; demo done in {time.perf_counter() - started:.0f} s")
        return rows


def demo_plan(k: int, seed: int, quick: bool, jobs: str, data: str) -> DemoPlan:
    """The demo's specs must be there; its report folder starts with an empty log (this demo's only)."""
    if not Path(jobs, "digits-pretrain.yaml").is_file():
        raise UserError(f"the demo reads its job specs from ./{jobs}: run it from a tlray checkout")
    out = Path("outputs", "demo").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / console.LOG_FILE).write_text("")
    return DemoPlan(Path(jobs), Path(data), out, k, seed, quick, None, None)


# ---------------------------------------------------------------------------------------
# The jobs
# ---------------------------------------------------------------------------------------
QUICK = ("train.epochs=2",)  # --quick: what CI runs
QUICK_TARGETS = 1  # the new domain: every mode and the search, on one target
# the quick search still weighs random init against pretrained weights, in as many trials as before
QUICK_SEARCH = ("tune.freeze_depth=[random, all]", "tune.num_samples=2", "tune.grace_period=1")


@dataclass(frozen=True)
class Job:
    """One job of the demo: a spec in jobs/ and its overrides, as `tlray train SPEC --set ...` runs it."""

    spec_file: str
    overrides: tuple[str, ...]

    def spec(self) -> JobSpec:
        return load_spec(self.spec_file, self.overrides)


def job(plan: DemoPlan, name: str, images: str, *overrides: str) -> Job:
    sized = [*QUICK, *(QUICK_SEARCH if has_tune(overrides) else ())] if plan.quick else []
    where = [f"dataset.uri={images}", f"train.seed={plan.seed}"]
    if plan.s3:
        where += [f"output.uri={plan.s3}/outputs", f"dataset.endpoint_url={plan.endpoint_url}"]
    else:
        where += [f"output.uri={plan.out.parent}"]
    return Job(str(plan.jobs / f"{name}.yaml"), (*where, *sized, *overrides))


def job_spec(plan: DemoPlan, name: str, images: str, *overrides: str) -> JobSpec:
    return job(plan, name, images, *overrides).spec()


def has_tune(overrides: tuple[str, ...]) -> bool:
    return "tune=null" not in overrides


def train_source(plan: DemoPlan, target: Target, images: str) -> str:
    """Train the source task from random init; its published state_dict, stored where the targets read it."""
    source = job(plan, target.source_spec, images, "tune=null")
    spec = source.spec()
    published, wall = quietly(plan, source)
    weights = storage.join(published.uri, "model", "state_dict.pt")
    # a copy where the target specs in jobs/ name it, for `tlray train` and `tune` after the demo; the demo's own
    # jobs name the published file, whose run id changes with the source (and so changes theirs)
    (plan.data / f"{target.source_spec}.pt").write_bytes(storage.read_bytes(weights, plan.endpoint_url))
    console.say(
        f"source {spec.name}: val_accuracy {published.metrics['val_accuracy']:.4f} in {wall:.0f} s "
        f"-> pretrained weights {weights}"
    )
    return weights


def mode_overrides(plan: DemoPlan, target: Target, weights: str) -> list[tuple[str, ...]]:
    """Random init, partial at depths from 0 (full fine-tune) to the deepest, feature extractor."""
    spec = load_spec(plan.jobs / f"{target.spec}.yaml")
    blocks = len(archs.backbone_block_names(spec.model.arch))
    depths = sorted({0, blocks // 2, blocks - 1})
    rows = [("model.mode=architecture", "model.weights=none", "model.freeze_depth=null")]
    rows += [("model.mode=partial", f"model.weights={weights}", f"model.freeze_depth={d}") for d in depths]
    rows += [("model.mode=feature_extractor", f"model.weights={weights}", "model.freeze_depth=null")]
    return [(*row, "tune=null") for row in rows]  # the target spec's search is the demo's last job


def run_row(plan: DemoPlan, target: Target, images: str, overrides: tuple[str, ...]) -> Row:
    mode = overrides[0].split("=", 1)[1]
    depth = overrides[2].split("=", 1)[1]
    suffix = {"architecture": "random", "feature_extractor": "fe"}.get(mode, f"d{depth}")
    row_job = job(plan, target.spec, images, *overrides, f"name={target.spec}-{suffix}")
    spec = row_job.spec()
    published, wall = quietly(plan, row_job)
    row = row_of(target, MODE_NAMES[mode], spec, published.uri, wall, spec.train.lr)
    console.say(f"{target.name:<12} {row.mode:<18} depth {row.freeze_depth}: val_accuracy {row.val_accuracy:.4f}")
    return row


def run_search(plan: DemoPlan, target: Target, images: str, weights: str) -> Row:
    """`tlray tune` on the target spec (its tune section), from the same pretrained weights."""
    search = job(plan, target.spec, images, f"model.weights={weights}", f"name={target.spec}-tune")
    spec = search.spec()
    started = time.perf_counter()
    with redirected(plan):
        published = tune(search.spec_file, search.overrides)  # its run (not latest.json: the champion gate decides)
    wall = time.perf_counter() - started
    metadata = storage.read_json(storage.join(published.uri, "metadata.json"), plan.endpoint_url)
    row = row_of(target, "tune", spec, published.uri, wall, metadata["hyperparameters"]["lr"])
    row = dataclasses.replace(row, random_init=metadata["mode"] == "architecture")
    pick = "random init" if row.random_init else f"depth {row.freeze_depth}"
    console.say(f"{target.name:<12} tune: lr {row.lr:.2g}, {pick}: val_accuracy {row.val_accuracy:.4f}")
    return row


MODE_NAMES = {"architecture": "random init", "partial": "partial", "feature_extractor": "feature extractor"}


def row_of(target: Target, mode: str, spec: JobSpec, run: str, wall: float, lr: float) -> Row:
    metadata = storage.read_json(storage.join(run, "metadata.json"), spec.dataset.endpoint_url)
    history = storage.read_json(storage.join(run, "metrics.json"), spec.dataset.endpoint_url)["history"]
    return Row(
        target=target.name,
        mode=mode,
        freeze_depth=metadata["freeze_depth"],
        trainable=metadata["trainable_parameters"],
        val_accuracy=metadata["selection"]["value"],
        train_seconds=sum(epoch["epoch_seconds"] for epoch in history),
        wall_seconds=wall,
        run=run,
        lr=lr,
        curve=[epoch["val_accuracy"] for epoch in history],
    )


def quietly(plan: DemoPlan, train_job: Job) -> tuple[PublishedRun, float]:
    """`tlray train` on `train_job`, its lines to the log; returns (published run, wall seconds)."""
    started = time.perf_counter()
    with redirected(plan):
        published = train(train_job.spec_file, train_job.overrides)
    return published, time.perf_counter() - started


@contextlib.contextmanager
def redirected(plan: DemoPlan):
    """A job's own lines (printed, and logged by tlray's logger) into the demo's log file."""
    import logging

    streams = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    with (plan.out / console.LOG_FILE).open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        previous = [h.setStream(log) for h in streams]
        try:
            yield
        finally:
            for handler, stream in zip(streams, previous, strict=True):
                handler.setStream(stream)


# ---------------------------------------------------------------------------------------
# Where the images live: local folders, or the loopback S3 store with --s3
# ---------------------------------------------------------------------------------------
def upload(plan: DemoPlan, folder: Path) -> str:
    if not plan.s3:
        return str(folder)
    uri = f"{plan.s3}/data/{folder.name}"
    storage.upload_dir(folder, uri, plan.endpoint_url)
    return uri


# ---------------------------------------------------------------------------------------
# The table and the report
# ---------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(columns(asdict(r))) + " |" for r in rows]
    return "\n".join(lines)


def write_demo_report(plan: DemoPlan, rows: list[Row]) -> str:
    """results.json and table.md in the demo's folder, and the page drawn from them; returns the page."""
    plan.out.mkdir(parents=True, exist_ok=True)
    settings = {"k": plan.k, "seed": plan.seed, "quick": plan.quick, "s3": bool(plan.s3)}
    (plan.out / RESULTS).write_text(json.dumps({**settings, "rows": [asdict(r) for r in rows]}, indent=2))
    (plan.out / "table.md").write_text(table(rows) + "\n")
    return write_demo_page(str(plan.out))


DEMO_BUCKET = "tlray-demo"


@contextlib.contextmanager
def loopback_s3():
    """A moto S3 server on 127.0.0.1 (a real S3 wire protocol, in this process) with the demo's bucket."""
    import logging
    import os

    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise UserError("--s3 needs moto's server: pip install 'moto[server]'") from None
    from tlray.io import s3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in LOOPBACK_CREDENTIALS}
    os.environ.update(LOOPBACK_CREDENTIALS)  # Ray's workers start from this process's environment
    try:
        s3.client(endpoint).create_bucket(Bucket=DEMO_BUCKET)
        console.say(f"--s3: a loopback S3 server at {endpoint}, bucket s3://{DEMO_BUCKET}")
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


LOOPBACK_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}
