"""The `tlray` command line: its arguments, and which flow each command runs.

A command's flow lives in `tlray.flows.<command>`, as a function of the same name that takes the
command's arguments as keywords. It is imported only when its command runs, so `validate`, `render`
and `launch` load no ML stack (tests/unit/flows/test_light_cli.py). Exit codes: tlray.flows.exits.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable
from typing import NamedTuple

from tlray import console
from tlray.flows.exits import exit_code_of
from tlray.k8s import manifests as k8s  # light: neither torch nor pyarrow
from tlray.spec import load_spec


class Command(NamedTuple):
    flow: str  # the module whose function named like the command runs it
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


def spec_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("spec_file", metavar="SPEC", help="job spec YAML file (see jobs/)")
    sub.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec value, parsed as YAML, e.g. --set train.lr=0.01 (repeatable)",
    )


IF_DATA_CHANGED_HELP = (
    "exit 0 without training when the dataset's fingerprint equals the champion's (<output.uri>/<name>/latest.json)"
)


def run_arguments(sub: argparse.ArgumentParser) -> None:
    """`train` and `tune`."""
    spec_arguments(sub)
    sub.add_argument("--if-data-changed", action="store_true", help=IF_DATA_CHANGED_HELP)


def demo_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--k", type=int, default=10, help="labelled training images per class of a target (default 10)")
    sub.add_argument("--seed", type=int, default=0, help="which k images are labelled, and the training seed")
    sub.add_argument("--s3", action="store_true", help="run it all through a loopback S3 server (moto)")
    sub.add_argument(
        "--quick", action="store_true", help="a smoke-test size: the new-domain target only, 2 epochs, 2 trials (CI)"
    )


MODEL_HELP = "a published run (folder or s3:// URI), or a job's latest.json (its champion)"
PREDICT_EPILOG = """\
As a Ray job on a cluster whose nodes have tlray installed (GPUs are used when the cluster has them):

  ray job submit -- tlray predict s3://bucket/tlray/pets/latest.json s3://bucket/new-images \\
      --out s3://bucket/predictions/pets.parquet
"""


def evaluate_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("model_uri", metavar="MODEL", help=MODEL_HELP)
    sub.add_argument(
        "data_uri", metavar="DATA_URI", help="labelled images, in a training layout: <uri>/<class>/<image>"
    )
    sub.add_argument("--manifest", help="a CSV/JSONL index (path, label) instead of class folders, as dataset.manifest")
    sub.add_argument(
        "--out", metavar="URI", help="folder or s3:// prefix for evaluation.json and confusion_matrix.json/.png"
    )
    model_command_options(sub)


def predict_arguments(sub: argparse.ArgumentParser) -> None:
    sub.formatter_class = argparse.RawDescriptionHelpFormatter
    sub.epilog = PREDICT_EPILOG
    sub.add_argument("model_uri", metavar="MODEL", help=MODEL_HELP)
    sub.add_argument("data_uri", metavar="DATA_URI", help="a folder or s3:// prefix of images (any depth)")
    sub.add_argument("--out", metavar="URI", required=True, help="the output file: .parquet or .csv, local or s3://")
    sub.add_argument("--top-k", type=int, default=5, help="classes and probabilities kept per image (default 5)")
    model_command_options(sub)


def model_command_options(sub: argparse.ArgumentParser) -> None:
    """`evaluate` and `predict` take a published model, not a spec."""
    sub.add_argument("--endpoint-url", help="S3-compatible endpoint for every s3:// URI of the command")
    sub.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")


def render_arguments(sub: argparse.ArgumentParser) -> None:
    spec_arguments(sub)
    sub.add_argument("--image", required=True, help="container image with tlray installed (see Dockerfile)")
    sub.add_argument("--namespace", help="namespace of every object (default: none, i.e. kubectl's current one)")
    sub.add_argument(
        "--kind",
        choices=k8s.KINDS,
        default="rayjob",
        help="rayjob: one run; raycluster: a long-lived autoscaling cluster for `ray job submit`; "
        "raycronjob: scheduled runs (KubeRay >= 1.6, feature gate RayCronJob; names up to 36 characters); "
        "cronjob: scheduled runs with a concurrency policy and starting deadline (a CronJob running `tlray launch`)",
    )
    sub.add_argument(
        "--schedule",
        default=k8s.DEFAULT_SCHEDULE,
        help=f"cron schedule of raycronjob/cronjob (default: '{k8s.DEFAULT_SCHEDULE}')",
    )
    cluster = sub.add_argument_group("cluster-dependent settings (see the README, 'Run on Kubernetes')")
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


def launch_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("template", metavar="TEMPLATE", help="name of the template RayCronJob (`<name>-template`)")
    sub.add_argument("--namespace", help="default: the pod's own namespace")
    sub.add_argument("--keep", type=int, default=5, help="finished runs kept; older ones are deleted (default 5)")
    sub.add_argument("--api-server", help="API server URL (default: in-cluster, with the pod's ServiceAccount)")
    sub.add_argument(
        "--if-data-changed",
        action="store_true",
        help="create no RayJob when the dataset's fingerprint equals the champion's (read here, with --spec)",
    )
    sub.add_argument(
        "--spec",
        dest="spec_file",
        metavar="SPEC",
        default=f"{k8s.SPEC_DIR}/{k8s.SPEC_FILE}",
        help="the job spec for --if-data-changed (default: the mounted ConfigMap); the template's --set apply",
    )


def report_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "run_uri",
        metavar="RUN_URI",
        help="a run's or a search's folder or s3:// URI, as `tlray train` / `tlray tune` printed it, or outputs/demo",
    )
    sub.add_argument("--endpoint-url", help="S3-compatible endpoint, when RUN_URI is in such a store")


def no_arguments(sub: argparse.ArgumentParser) -> None:
    pass


# In the order `tlray --help` lists them.
COMMANDS = {
    "validate": Command(
        "tlray.flows.validate",
        "Check a job spec and report every problem at once; list the model's blocks.",
        spec_arguments,
    ),
    "train": Command(
        "tlray.flows.train", "Fine-tune the spec's model on Ray Train and publish it to output.uri.", run_arguments
    ),
    "demo": Command(
        "tlray.flows.demo",
        "Transfer learning on scikit-learn's digits: train two source models, then few-shot targets in every "
        "mode and freeze depth, and a search; print the table, write a report to outputs/demo/report.",
        demo_arguments,
    ),
    "tune": Command(
        "tlray.flows.tune",
        "Search learning rate and freeze depth (the spec's tune section) with Ray Tune; "
        "publish the best trial's model and write a report.",
        run_arguments,
    ),
    "evaluate": Command(
        "tlray.flows.evaluate",
        "Score a published model on labelled images: accuracy, top-5, per-class precision/recall/F1, "
        "confusion matrix (JSON and PNG).",
        evaluate_arguments,
    ),
    "predict": Command(
        "tlray.flows.predict",
        "Classify every image under a folder or S3 prefix with a published model (Ray Data); "
        "writes Parquet, or CSV when --out ends in .csv.",
        predict_arguments,
    ),
    "render": Command(
        "tlray.flows.render",
        "Print Kubernetes manifests for the spec (KubeRay RayJob by default), sized from its scaling section.",
        render_arguments,
    ),
    "launch": Command(
        "tlray.flows.launch",
        "Create a RayJob from a suspended template RayCronJob (what the scheduled CronJob runs in its pod).",
        launch_arguments,
    ),
    "report": Command(
        "tlray.flows.report",
        "Redraw the report page (report/index.html and its PNGs) of a run, a search or the demo from its stored "
        "results.",
        report_arguments,
    ),
    "reference": Command(
        "tlray.flows.reference",
        "Print the job spec reference (Markdown) from the spec's field descriptions.",
        no_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
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
    for name, command in COMMANDS.items():
        command.arguments(commands.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    options = vars(build_parser().parse_args(argv))
    name, verbose = options.pop("command"), options.pop("verbose")
    console.set_verbose(verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="[tlray] %(message)s")

    def run() -> None:
        if "overrides" in options:  # a spec command: a bad spec is exit 2 before the flow imports torch and Ray
            load_spec(options["spec_file"], options["overrides"])
        flow = getattr(importlib.import_module(COMMANDS[name].flow), name)
        flow(**options)

    return exit_code_of(run)
