"""The `tlray` command line. Each command reads like a table of contents of what it does.

Exit codes: 0 success, 2 bad input (spec, data, paths: one clear message, no
traceback), 1 internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from tlray.errors import UserError, user_error_inside

log = logging.getLogger("tlray")

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


def cmd_validate(args: argparse.Namespace) -> int:
    from tlray import models
    from tlray.publish import runs_uri
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)
    blocks = models.backbone_block_names(spec.model.arch)
    depth = spec.freeze_depth
    print(f"{args.spec}: valid job spec '{spec.name}'")
    print(f"  model: {spec.model.arch} ({models.family_of(spec.model.arch)}), weights {spec.model.weights}, mode {spec.model.mode}")
    print(f"  frozen blocks: {depth} of {len(blocks)}")
    for i, block in enumerate(blocks):
        print(f"    {i + 1:>3} {block:<24} {'frozen' if i < depth else 'trained'}")
    print(f"  workers: {spec.scaling.num_workers} x {'GPU' if spec.scaling.use_gpu else 'CPU'}")
    print(f"  output: {runs_uri(spec)}/{spec.name}-<hash of spec and data>")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)  # 1. parse and validate the whole spec
    published = train_and_publish(spec)
    print(f"[tlray] model published to {published.uri}/model")
    print(f"[tlray] val_accuracy {published.metrics['val_accuracy']:.4f} after {published.metrics['epoch']} epochs")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from tlray.demo import write_digits
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)
    count = write_digits(spec.dataset.uri)
    print(f"[tlray] scikit-learn digits: {count} images as an image folder in {spec.dataset.uri}")
    published = train_and_publish(spec)
    print(f"[tlray] model published to {published.uri}/model")
    print(f"[tlray] digits val_accuracy {published.metrics['val_accuracy']:.4f} after {published.metrics['epoch']} epochs")
    if args.save_weights:  # a local copy that later specs (jobs/digits-tune.yaml) start from
        from tlray import storage

        Path(args.save_weights).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_weights).write_bytes(storage.read_bytes(f"{published.uri}/model/state_dict.pt", spec.dataset.endpoint_url))
        print(f"[tlray] weights saved to {args.save_weights}")
    return EXIT_OK


def cmd_reference(args: argparse.Namespace) -> int:
    from tlray.spec import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from tlray import report, storage, tune
    from tlray.publish import freeze_summary, publish, run_uri
    from tlray.spec import load_spec
    from tlray.train import load_checkpoint_at

    spec = load_spec(args.spec, args.set)  # 1. parse and validate the whole spec
    if spec.tune is None:
        raise UserError("tune: the spec has no tune section; add one (see jobs/digits-tune.yaml) or use `tlray train`")
    index = prepare(spec)  # 2-4. data, output, weights
    tune.check_searchable(spec, index)
    start_ray()  # 5. join the cluster (RAY_ADDRESS / inside a job) or start a local one
    run = run_uri(spec, index, "tune")
    print(f"[tlray] search {run.rsplit('/', 1)[-1]}: trials, results, report and best model under {run}")
    grid = tune.search(spec, index, run)  # 6. one TorchTrainer per trial, ASHA stops weak ones
    tune.raise_if_no_trial_finished(grid)
    rows = tune.result_rows(grid, spec)
    print(tune.results_table(rows, spec))
    tune.write_results(rows, run, spec)

    best = tune.best_trial(rows)  # 7. publish the best trial exactly as `tlray train` would
    best_spec = tune.best_trial_spec(spec, best)
    filesystem, _ = storage.filesystem(run, spec.dataset.endpoint_url)
    state = load_checkpoint_at(best["checkpoint"], filesystem)
    summary = freeze_summary(best_spec, len(index.classes))
    hyperparameters = {"lr": best["lr"], "freeze_depth": summary.depth, "trial": best["trial"]}
    published = publish(best_spec, index, summary, state, run, hyperparameters)

    confusion = report.confusion_matrix_of(best_spec, index, state)  # 8. the report
    storage.write_json(storage.join(run, "confusion_matrix.json"), {**confusion, "trial": best["trial"]}, spec.dataset.endpoint_url)
    page = report.write_report(run, spec.dataset.endpoint_url)
    print(f"[tlray] best trial {best['trial']}: lr {best['lr']:.3g}, freeze_depth {best['freeze_depth']}, "
          f"{spec.tune.metric} {best['metric']:.4f}")
    print(f"[tlray] model published to {published.uri}/model")
    print(f"[tlray] report: {page}")
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from tlray import k8s
    from tlray.spec import load_spec

    spec = load_spec(args.spec, args.set)  # the whole spec is checked before anything is printed
    for warning in k8s.cluster_warnings(spec):
        print(f"tlray: warning: {warning}", file=sys.stderr)
    # The ConfigMap carries the spec as written plus any --set, with defaults left implicit.
    spec_yaml = f"# rendered by tlray render from {args.spec}\n" + yaml.safe_dump(
        spec.model_dump(mode="json", exclude_unset=True), sort_keys=False
    )
    objects = k8s.render(spec, spec_yaml, args.image, args.kind, args.namespace, args.schedule)
    print(k8s.to_yaml(objects), end="")
    return EXIT_OK


def cmd_launch(args: argparse.Namespace) -> int:
    from tlray import launch

    api = launch.KubernetesApi(args.api_server) if args.api_server else launch.KubernetesApi.in_cluster()
    launch.launch(api, args.namespace or launch.current_namespace(), args.template, keep=args.keep)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from tlray.report import write_report

    print(f"[tlray] report: {write_report(args.run_uri.rstrip('/'), args.endpoint_url)}")
    return EXIT_OK


def prepare(spec):
    """Every check before cluster work, shared by train and tune: data index, output, weights."""
    from tlray import models
    from tlray.data import build_index
    from tlray.publish import check_output
    from tlray.train import fetch_weights

    index = build_index(spec.dataset)  # list and split the data; every data problem is exit 2 here
    print(f"[tlray] dataset: {index.summary()}")
    check_output(spec)  # the output location is reachable, before anything is written
    weights = fetch_weights(spec.model.builder_weights, spec.dataset.endpoint_url)
    models.build_model(spec.model.arch, weights, len(index.classes))  # the weights load
    return index


def train_and_publish(spec):
    """Shared by `train` and `demo`."""
    from tlray.publish import freeze_summary, publish, run_uri
    from tlray.train import fit, load_checkpoint_state

    index = prepare(spec)  # 2-4. data, output, weights
    start_ray()  # 5. join the cluster (RAY_ADDRESS / inside a job) or start a local one
    run = run_uri(spec, index)
    print(f"[tlray] run {run.rsplit('/', 1)[-1]}: checkpoints and model under {run}")
    result = fit(spec, index, run)  # 6. fine-tune on Ray Train workers, data streamed by Ray Data
    state = load_checkpoint_state(result.checkpoint)
    return publish(spec, index, freeze_summary(spec, len(index.classes)), state, run)  # 7. export and describe


def start_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


def build_parser() -> argparse.ArgumentParser:
    from tlray import k8s

    parser = argparse.ArgumentParser(
        prog="tlray",
        description="Fine-tune pretrained torchvision image classifiers on Ray Train, from one YAML job spec.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    add("train", cmd_train, "Fine-tune the spec's model on Ray Train and publish it to output.uri.")
    demo = add(
        "demo",
        cmd_demo,
        "Write scikit-learn's handwritten digits to the spec's dataset.uri as an image folder, then train.",
    )
    demo.add_argument("--save-weights", metavar="PATH", help="also copy the trained state_dict to PATH")
    add(
        "tune",
        cmd_tune,
        "Search learning rate and freeze depth (the spec's tune section) with Ray Tune; "
        "publish the best trial's model and write a report.",
    )
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
        "raycronjob: scheduled runs (KubeRay >= 1.6, feature gate RayCronJob); "
        "cronjob: scheduled runs on any cluster (a CronJob running `tlray launch`)",
    )
    render.add_argument(
        "--schedule", default=k8s.DEFAULT_SCHEDULE, help=f"cron schedule of raycronjob/cronjob (default: '{k8s.DEFAULT_SCHEDULE}')"
    )
    launch = add(
        "launch",
        cmd_launch,
        "Create a RayJob from a suspended template RayJob (what the scheduled CronJob runs in its pod).",
        with_spec=False,
    )
    launch.add_argument("template", metavar="TEMPLATE", help="name of the RayJob template (`<name>-template`)")
    launch.add_argument("--namespace", help="default: the pod's own namespace")
    launch.add_argument("--keep", type=int, default=5, help="finished runs kept; older ones are deleted (default 5)")
    launch.add_argument("--api-server", help="API server URL (default: in-cluster, with the pod's ServiceAccount)")
    sub = add("report", cmd_report, "Rebuild a search's report (PNG plots + index.html) from its stored results.", with_spec=False)
    sub.add_argument("run_uri", metavar="RUN_URI", help="the search's run folder or s3:// URI, as `tlray tune` printed it")
    sub.add_argument("--endpoint-url", help="S3-compatible endpoint, when RUN_URI is in such a store")
    add("reference", cmd_reference, "Print the job spec reference (Markdown) from the spec's field descriptions.", with_spec=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[tlray] %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        stop_ray()
        print("tlray: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — the last line of defence: say whose fault it is
        user_error = user_error_inside(exc)  # also finds one raised on a Ray worker
        if user_error is None:
            traceback.print_exc()
        stop_ray()  # so Ray's forwarded worker logs end before tlray's last word
        if user_error is not None:
            print(f"tlray: error: {user_error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"tlray: internal error ({type(exc).__name__}); please report it with the output above", file=sys.stderr)
        return EXIT_INTERNAL


def stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
