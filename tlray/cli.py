"""The `tlray` command line. Each command reads like a table of contents of what it does.

Exit codes: 0 success, 2 bad input (spec, data, paths: one clear message, no
traceback), 3 an image that could not be read after retries (the run stopped, nothing
published; running it again resumes), 1 internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
import traceback

from tlray import console
from tlray.errors import ReadFailure, UserError, error_inside, user_error_inside

log = logging.getLogger("tlray")

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_IO_FAILURE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + 2, 128 + 15  # as a shell reports SIGINT and SIGTERM
TERMINATED: list[int] = []  # the SIGTERM received, if any


def cmd_validate(args: argparse.Namespace) -> int:
    from tlray.models import archs  # the block table, not torchvision: validate stays under a second
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)
    model, depth = spec.model, spec.freeze_depth
    blocks = archs.backbone_block_names(model.arch)
    print(f"{args.spec}: valid job spec '{spec.name}'")
    print(f"  model: {model.arch} ({archs.family_of(model.arch)}), weights {model.weights}, mode {model.mode}")
    print(f"  frozen blocks: {depth} of {len(blocks)}")
    for i, block in enumerate(blocks):
        print(f"    {i + 1:>3} {block:<24} {'frozen' if i < depth else 'trained'}")
    print(f"  workers: {spec.scaling.num_workers} x {'GPU' if spec.scaling.use_gpu else 'CPU'}")
    print(f"  output: {spec.job_uri}/runs/{spec.name}-<hash of spec and data>")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)  # 1. parse and validate the whole spec
    published = train_and_publish(spec, args.if_data_changed)
    if published is None:  # --if-data-changed, and the champion was trained on exactly this data
        return EXIT_OK
    print(f"[tlray] model published to {published.uri}/model")
    print(f"[tlray] val_accuracy {published.metrics['val_accuracy']:.4f} after {published.metrics['epoch']} epochs")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from tlray.flows import demo

    demo.run(args.k, args.seed, args.s3, args.quick)
    return EXIT_OK


def cmd_reference(args: argparse.Namespace) -> int:
    from tlray.spec import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)  # 1. parse and validate the whole spec
    search_and_publish(spec, args.if_data_changed)
    return EXIT_OK


def search_and_publish(spec, if_data_changed: bool = False):
    """Shared by `tune` and `demo`: search, publish the best trial; None when its data is unchanged."""
    from tlray.artifacts import champion
    from tlray.artifacts.publish import is_sealed, publish, published_run, run_uri, write_manifest
    from tlray.flows import report
    from tlray.io import storage
    from tlray.plan import plan_run
    from tlray.training import nodes, tune
    from tlray.training.train import load_selected_checkpoint

    if spec.tune is None:
        raise UserError(
            "tune: the spec has no tune section; add one (see jobs/digits-new-domain.yaml) or use `tlray train`"
        )
    prepared = prepare(spec, if_data_changed)  # 2-4. data, output, weights
    if prepared is None:  # --if-data-changed, and the champion was trained on exactly this data
        return None
    spec, index, model = prepared
    tune.check_searchable(spec, index)
    run = run_uri(spec, index, "tune")
    console.start_ray(console.log_path_for(run))  # 5. join the cluster (RAY_ADDRESS / inside a job) or start one
    nodes.check_every_node_sees_local_paths(spec, index)
    print(f"[tlray] search {run.rsplit('/', 1)[-1]}: trials, results, report and best model under {run}")
    plan = plan_run(spec, data_source(spec, index), run, model)  # 6. the run plan, each trial's from it
    grid = tune.search(plan)  # 7. one TorchTrainer per trial, ASHA stops weak ones
    tune.raise_if_interrupted(grid, spec)  # Ctrl-C: nothing is published, the same command resumes
    tune.raise_if_no_trial_finished(grid)
    rows = tune.result_rows(grid, spec)
    print(tune.results_table(rows, spec))
    best = tune.best_trial(rows)
    best_plan = plan.for_best_trial(tune.best_trial_spec(spec, best), model, best["trial"])
    endpoint = spec.dataset.endpoint_url
    if is_sealed(run, endpoint):  # a finished search, run again: its published files stay as they are
        published = published_run(run, endpoint)
    else:
        tune.write_results(rows, run, spec)
        # 8. publish the best trial's selected epoch exactly as `tlray train` would
        state, history = load_selected_checkpoint(best_plan.checkpoints_uri, endpoint, spec.train.select_metric)
        confusion = report.confusion_matrix_of(model, plan.data, state)  # 9. the report
        storage.write_json(storage.join(run, "confusion_matrix.json"), {**confusion, "trial": best["trial"]}, endpoint)
        hyperparameters = {"lr": best["lr"], "freeze_depth": best_plan.freeze.depth, "trial": best["trial"]}
        published = publish(best_plan, model, state, hyperparameters, history, seal=False)
        write_manifest(run, endpoint)  # last: from now on the run is complete
    page = report.write_report(run, endpoint)  # report/ is not in the manifest: `tlray report` redraws it
    champion.decide(best_plan.spec, run, plan.data)  # 10. the champion gate
    print(
        f"[tlray] best trial {best['trial']}: lr {best['lr']:.3g}, freeze_depth {best['freeze_depth']}, "
        f"{spec.tune.metric} {best['metric']:.4f}"
    )
    print(f"[tlray] model published to {published.uri}/model")
    print(f"[tlray] report: {page}")
    return published


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from tlray.k8s import manifests as k8s
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)  # the whole spec is checked before anything is printed
    for warning in k8s.cluster_warnings(spec):
        print(f"tlray: warning: {warning}", file=sys.stderr)
    # The ConfigMap carries the spec as written plus any --set, with defaults left implicit.
    spec_yaml = f"# rendered by tlray render from {args.spec}\n" + yaml.safe_dump(
        spec.model_dump(mode="json", exclude_unset=True), sort_keys=False
    )
    options = k8s.ClusterOptions(
        api_server_ports=tuple(args.api_server_port),
        dns_ports=tuple(args.dns_port),
        irsa_role_arn=args.irsa_role_arn,
        priority_class=args.priority_class,
        queue=args.queue,
        egress_ports=tuple(args.egress_port),
        node_selector=tuple(k8s.node_selector_pair(pair) for pair in args.node_selector),
    )
    objects = k8s.render(spec, spec_yaml, args.image, args.kind, args.namespace, args.schedule, options)
    for warning in k8s.kind_warnings(args.kind):
        print(f"tlray: warning: {warning}", file=sys.stderr)
    for note in k8s.egress_notes(spec, options):
        print(f"tlray: {note}", file=sys.stderr)
    print(k8s.to_yaml(objects), end="")
    return EXIT_OK


def cmd_launch(args: argparse.Namespace) -> int:
    from tlray.k8s import launch

    api = launch.KubernetesApi(args.api_server) if args.api_server else launch.KubernetesApi.in_cluster()
    data_check = launch.data_check(args.spec) if args.if_data_changed else None
    launch.launch(api, args.namespace or launch.current_namespace(), args.template, args.keep, data_check)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from tlray.flows.report import write_report

    print(f"[tlray] report: {write_report(args.run_uri.rstrip('/'), args.endpoint_url)}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tlray.flows.evaluate import evaluate
    from tlray.spec import DatasetSpec

    layout = "manifest" if args.manifest else "imagefolder"
    dataset = DatasetSpec(uri=args.data_uri, layout=layout, manifest=args.manifest, endpoint_url=args.endpoint_url)
    evaluate(args.model, dataset, args.out, args.batch_size)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from tlray.flows.predict import predict

    predict(args.model, args.data_uri, args.out, args.endpoint_url, args.batch_size, args.top_k)
    return EXIT_OK


def prepare(spec, if_data_changed: bool = False):
    """Every check before cluster work, shared by train and tune: data index, output, weights.

    Returns (spec, index, model): the spec's warm-start weights (`latest`, a run) resolved to a checkpoint, and
    the run's one model on the driver, built from those weights (they load); or None with `if_data_changed`
    when the champion was trained on exactly this data.
    """
    from tlray.artifacts import champion, warmstart
    from tlray.artifacts.publish import check_output, check_selectable
    from tlray.data.dataset import build_index
    from tlray.io.weights import fetch_weights
    from tlray.models.build import build_model

    index = build_index(spec.dataset)  # list and split the data; every data problem is exit 2 here
    print(f"[tlray] dataset: {index.summary()}")
    if if_data_changed:
        unchanged = champion.unchanged_data_message(spec.job_uri, index.fingerprint, spec.dataset.endpoint_url)
        if unchanged:
            print(unchanged)
            return None
    check_output(spec)  # the output location is reachable, before anything is written
    check_selectable(spec, index)
    spec = warmstart.resolve(spec, index)  # model.weights: latest -> the champion's checkpoint
    weights = fetch_weights(spec.model.builder_weights, spec.dataset.endpoint_url)
    model = build_model(spec.model.arch, weights, len(index.classes))  # the weights load
    return spec, index, model


def train_and_publish(spec, if_data_changed: bool = False):
    """Shared by `train` and `demo`; None when `if_data_changed` finds the champion's data unchanged."""
    from tlray.artifacts import champion
    from tlray.artifacts.publish import publish, run_uri
    from tlray.plan import plan_run
    from tlray.training import nodes
    from tlray.training.train import fit, load_selected_checkpoint

    prepared = prepare(spec, if_data_changed)  # 2-4. data, output, weights
    if prepared is None:
        return None
    spec, index, model = prepared
    run = run_uri(spec, index)
    console.start_ray(console.log_path_for(run))  # 5. join the cluster (RAY_ADDRESS / inside a job) or start one
    nodes.check_every_node_sees_local_paths(spec, index)
    print(f"[tlray] run {run.rsplit('/', 1)[-1]}: checkpoints and model under {run}")
    plan = plan_run(spec, data_source(spec, index), run, model)  # 6. the run plan: all the workers get
    started = time.perf_counter()
    fit(plan)  # 7. fine-tune on Ray Train workers, data streamed by Ray Data
    print(f"[tlray] trained in {time.perf_counter() - started:.1f} s", flush=True)
    # the best epoch of every sealed one
    state, history = load_selected_checkpoint(plan.checkpoints_uri, spec.dataset.endpoint_url, spec.train.select_metric)
    published = publish(plan, model, state, history=history)  # 8. export, describe, MANIFEST last
    champion.decide(spec, run, plan.data)  # 9. the champion gate: move latest.json only for a better model
    return published


def data_source(spec, index):
    """The index's keys into Ray's object store: what workers and trials read the data through."""
    from tlray.data import dataset as data
    from tlray.models.preprocessing import preprocessing as preprocessing_for

    model = spec.model  # the weights' own preset: resnet50's V1 and V2 resize differently
    preprocessing = preprocessing_for(model.arch, spec.dataset.image_size, model.builder_weights)
    return data.data_source(index, spec.dataset, preprocessing, seed=spec.train.seed)


def build_parser() -> argparse.ArgumentParser:
    from tlray.k8s import manifests as k8s  # light: neither torch nor pyarrow (tests/test_light_cli.py)

    parser = argparse.ArgumentParser(
        prog="tlray",
        description="Fine-tune pretrained torchvision image classifiers on Ray Train, from one YAML job spec.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's own output live (it always goes to ray.log); debug logs",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str, with_spec: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        if with_spec:
            sub.add_argument("spec", metavar="SPEC", help="job spec YAML file (see jobs/)")
            sub.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY.PATH=VALUE",
                help="override a spec value, parsed as YAML, e.g. --set train.lr=0.01 (repeatable)",
            )
        sub.set_defaults(func=func)
        return sub

    add("validate", cmd_validate, "Check a job spec and report every problem at once; list the model's blocks.")
    train = add("train", cmd_train, "Fine-tune the spec's model on Ray Train and publish it to output.uri.")
    train.add_argument("--if-data-changed", action="store_true", help=IF_DATA_CHANGED_HELP)
    demo = add(
        "demo",
        cmd_demo,
        "Transfer learning on scikit-learn's digits: train two source models, then few-shot targets in every "
        "mode and freeze depth, and a search; print the table, write a report to outputs/demo.",
        with_spec=False,
    )
    demo.add_argument("--k", type=int, default=10, help="labelled training images per class of a target (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="which k images are labelled, and the training seed")
    demo.add_argument("--s3", action="store_true", help="run it all through a loopback S3 server (moto)")
    demo.add_argument(
        "--quick", action="store_true", help="a smoke-test size: the new-domain target only, 2 epochs, 2 trials (CI)"
    )
    tune = add(
        "tune",
        cmd_tune,
        "Search learning rate and freeze depth (the spec's tune section) with Ray Tune; "
        "publish the best trial's model and write a report.",
    )
    tune.add_argument("--if-data-changed", action="store_true", help=IF_DATA_CHANGED_HELP)
    add_model_commands(add)
    render = add(
        "render",
        cmd_render,
        "Print Kubernetes manifests for the spec (KubeRay RayJob by default), sized from its scaling section.",
    )
    render.add_argument("--image", required=True, help="container image with tlray installed (see Dockerfile)")
    render.add_argument("--namespace", help="namespace of every object (default: none, i.e. kubectl's current one)")
    render.add_argument(
        "--kind",
        choices=k8s.KINDS,
        default="rayjob",
        help="rayjob: one run; raycluster: a long-lived autoscaling cluster for `ray job submit`; "
        "raycronjob: scheduled runs (KubeRay >= 1.6, feature gate RayCronJob; names up to 36 characters); "
        "cronjob: scheduled runs with a concurrency policy and starting deadline (a CronJob running `tlray launch`)",
    )
    render.add_argument(
        "--schedule",
        default=k8s.DEFAULT_SCHEDULE,
        help=f"cron schedule of raycronjob/cronjob (default: '{k8s.DEFAULT_SCHEDULE}')",
    )
    cluster = render.add_argument_group("cluster-dependent settings (see the README, 'Run on Kubernetes')")
    cluster.add_argument(
        "--api-server-port",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="also let the pods reach the API server's endpoint on PORT (minikube: 8443); 443 and 6443 are open",
    )
    cluster.add_argument(
        "--dns-port",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="also allow DNS on PORT (OpenShift: 5353); 53 is open to any resolver, NodeLocal DNSCache included",
    )
    cluster.add_argument(
        "--irsa-role-arn",
        metavar="ARN",
        help="S3 through EKS IRSA: annotate the Ray ServiceAccount with this role (default: EKS Pod Identity, "
        "or the optional tlray-s3-credentials Secret)",
    )
    cluster.add_argument("--priority-class", metavar="NAME", help="PriorityClass of the Ray pods (it must exist)")
    cluster.add_argument(
        "--queue",
        metavar="NAME",
        help="Kueue LocalQueue: the kueue.x-k8s.io/queue-name label of the RayJob (or of each run of --kind cronjob)",
    )
    cluster.add_argument(
        "--egress-port",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="also let the pods reach TCP PORT anywhere (a store or server the spec does not name); the port of "
        "dataset.endpoint_url is opened without it",
    )
    cluster.add_argument(
        "--node-selector",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        help="place the workers on nodes with this label, one the autoscaler knows before the node exists "
        "(Karpenter: karpenter.k8s.aws/instance-gpu-name=l4; GKE: cloud.google.com/gke-accelerator=nvidia-l4)",
    )
    launch = add(
        "launch",
        cmd_launch,
        "Create a RayJob from a suspended template RayCronJob (what the scheduled CronJob runs in its pod).",
        with_spec=False,
    )
    launch.add_argument("template", metavar="TEMPLATE", help="name of the template RayCronJob (`<name>-template`)")
    launch.add_argument("--namespace", help="default: the pod's own namespace")
    launch.add_argument("--keep", type=int, default=5, help="finished runs kept; older ones are deleted (default 5)")
    launch.add_argument("--api-server", help="API server URL (default: in-cluster, with the pod's ServiceAccount)")
    launch.add_argument(
        "--if-data-changed",
        action="store_true",
        help="create no RayJob when the dataset's fingerprint equals the champion's (read here, with --spec)",
    )
    launch.add_argument(
        "--spec",
        default=f"{k8s.SPEC_DIR}/{k8s.SPEC_FILE}",
        help="the job spec for --if-data-changed (default: the mounted ConfigMap); the template's --set apply",
    )
    sub = add(
        "report",
        cmd_report,
        "Rebuild a search's report (PNG plots + index.html) from its stored results.",
        with_spec=False,
    )
    sub.add_argument(
        "run_uri", metavar="RUN_URI", help="the search's run folder or s3:// URI, as `tlray tune` printed it"
    )
    sub.add_argument("--endpoint-url", help="S3-compatible endpoint, when RUN_URI is in such a store")
    add(
        "reference",
        cmd_reference,
        "Print the job spec reference (Markdown) from the spec's field descriptions.",
        with_spec=False,
    )
    return parser


IF_DATA_CHANGED_HELP = (
    "exit 0 without training when the dataset's fingerprint equals the champion's (<output.uri>/<name>/latest.json)"
)
MODEL_HELP = "a published run (folder or s3:// URI), or a job's latest.json (its champion)"
PREDICT_EPILOG = """\
As a Ray job on a cluster whose nodes have tlray installed (GPUs are used when the cluster has them):

  ray job submit -- tlray predict s3://bucket/tlray/pets/latest.json s3://bucket/new-images \\
      --out s3://bucket/predictions/pets.parquet
"""


def add_model_commands(add) -> None:
    """`evaluate` and `predict`: they take a published model, not a spec."""
    evaluate = add(
        "evaluate",
        cmd_evaluate,
        "Score a published model on labelled images: accuracy, top-5, per-class precision/recall/F1, "
        "confusion matrix (JSON and PNG).",
        with_spec=False,
    )
    evaluate.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    evaluate.add_argument(
        "data_uri", metavar="DATA_URI", help="labelled images, in a training layout: <uri>/<class>/<image>"
    )
    evaluate.add_argument(
        "--manifest", help="a CSV/JSONL index (path, label) instead of class folders, as dataset.manifest"
    )
    evaluate.add_argument(
        "--out", metavar="URI", help="folder or s3:// prefix for evaluation.json and confusion_matrix.json/.png"
    )
    predict = add(
        "predict",
        cmd_predict,
        "Classify every image under a folder or S3 prefix with a published model (Ray Data); "
        "writes Parquet, or CSV when --out ends in .csv.",
        with_spec=False,
    )
    predict.formatter_class = argparse.RawDescriptionHelpFormatter
    predict.epilog = PREDICT_EPILOG
    predict.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    predict.add_argument("data_uri", metavar="DATA_URI", help="a folder or s3:// prefix of images (any depth)")
    predict.add_argument(
        "--out", metavar="URI", required=True, help="the output file: .parquet or .csv, local or s3://"
    )
    predict.add_argument("--top-k", type=int, default=5, help="classes and probabilities kept per image (default 5)")
    for sub in (evaluate, predict):
        sub.add_argument("--endpoint-url", help="S3-compatible endpoint for every s3:// URI of the command")
        sub.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.set_verbose(args.verbose)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[tlray] %(message)s")
    try:
        with sigterm_stops_the_run():
            return args.func(args)
    except (KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and not TERMINATED:  # SystemExit: Ray Train's SIGINT handler may end so
            raise
        stop_ray()
        if TERMINATED:
            print(
                "tlray: terminated (SIGTERM); every complete checkpoint is kept: run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_TERMINATED
        print("tlray: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 — the last line of defence: say whose fault it is
        user_error = user_error_inside(exc)  # also finds one raised on a Ray worker
        read_failure = error_inside(exc, ReadFailure)  # or in a Ray Data task under a worker
        if user_error is None and read_failure is None:
            traceback.print_exc()
        stop_ray()  # so Ray's forwarded worker logs end before tlray's last word
        if user_error is not None:
            print(f"tlray: error: {user_error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if read_failure is not None:
            print(
                f"tlray: error: {str(read_failure).splitlines()[0]}. The run stopped and published nothing; "
                "once the store is reachable, run the same command again to resume from the last checkpoint",
                file=sys.stderr,
            )
            return EXIT_IO_FAILURE
        print(f"tlray: internal error ({type(exc).__name__}); please report it with the output above", file=sys.stderr)
        return EXIT_INTERNAL


@contextlib.contextmanager
def sigterm_stops_the_run():
    """SIGTERM (Kubernetes' preemption and eviction, `kill`) stops a run as Ctrl-C does, instead of killing the
    process mid-call: Ray Train's SIGINT handler, while a run is on, aborts its workers. Checkpoints are sealed
    (tlray.checkpoints), so the next run resumes from the newest complete one, whenever the signal came."""
    TERMINATED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return

    def on_sigterm(signum, frame):
        TERMINATED.append(signum)
        on_sigint = signal.getsignal(signal.SIGINT)
        if getattr(on_sigint, "graceful", False):
            on_sigint(signal.SIGINT, frame)  # tlray.tune's: the search saves its state and returns
            return
        if callable(on_sigint) and on_sigint is not signal.default_int_handler:
            on_sigint(signal.SIGINT, frame)  # Ray Train's: abort the run's controller and workers
        raise KeyboardInterrupt

    previous = console.handle_sigterm(on_sigterm)
    try:
        yield
    finally:
        console.handle_sigterm(None)
        signal.signal(signal.SIGTERM, previous)


def stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
