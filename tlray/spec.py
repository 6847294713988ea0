"""The job spec: one YAML file that describes a whole fine-tuning job.

Typing and ranges live on the pydantic models below (every field described,
unknown keys forbidden). Rules that relate two fields live in ``RULES`` and
run per section, so one `tlray validate` reports every problem at once, each
under its dotted key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tlray import archs, names
from tlray.errors import UserError
from tlray.metrics import GATEABLE, SELECTABLE, metric_mode

CREDENTIAL_KEY = re.compile(r"secret|password|passwd|token|access_key|credential", re.IGNORECASE)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=False)


FreezeDepth = Annotated[
    int | Literal["all"],
    Field(union_mode="left_to_right"),
]

RANDOM_INIT = "random"  # a search's choice beside the freeze depths: the architecture alone, from random init
# One value of `tune.freeze_depth`: a freeze depth from the pretrained weights, or `random`
SearchChoice = Annotated[
    int | Literal["all", "random"],
    Field(union_mode="left_to_right"),
]

# The values of `dataset.layout`: each one is the module of that name in tlray.data.layouts
DataLayout = Literal["imagefolder", "manifest", "webdataset", "parquet"]


class DatasetSpec(_Section):
    uri: str = Field(
        description="Where the labelled images are: `s3://bucket/prefix` or a local folder "
        "(relative paths are relative to the working directory)."
    )
    layout: DataLayout = Field(
        "imagefolder",
        description="`imagefolder`: `<uri>/<class>/<image>` or `<uri>/train|val/<class>/<image>`; "
        "`manifest`: a CSV/JSONL index named by `manifest`; `webdataset`: `.tar` shards under `uri` (or a brace "
        "pattern, `shards-{000000..000099}.tar`) of `<key>.jpg|jpeg|png|webp` with `<key>.cls` (class index); "
        "`parquet`: `*.parquet` files under `uri` with an image column and a label column.",
    )
    manifest: str | None = Field(
        None,
        description="Path of the CSV/JSONL index (columns `path`, `label`, optional `split`); "
        "only with `layout: manifest`.",
    )
    classes: list[str] | None = Field(
        None,
        min_length=2,
        description="Class names by index (entry i names class i) for integer labels: a WebDataset's `.cls` files, "
        "a Parquet label column of integers without Hugging Face ClassLabel names; default: the indices as names. "
        "Only with `layout: webdataset` or `parquet`.",
    )
    image_column: str = Field(
        "image",
        min_length=1,
        description="Parquet column of the encoded images (bytes, or Hugging Face's `{bytes, path}` struct); "
        "only with `layout: parquet`.",
    )
    label_column: str = Field(
        "label",
        min_length=1,
        description="Parquet column of the labels: class names (strings) or class indices (integers); "
        "only with `layout: parquet`.",
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of images held out for validation when the data has no train/val folders."
    )
    split_seed: int = Field(
        0,
        description="Salt of the hash that assigns each image to train or val; the split is stable as files are added.",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Square input size in pixels; default: the pretrained weights' preset (e.g. 224).",
    )
    augment: bool = Field(False, description="Random-resized-crop and horizontal flip on training images.")
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="What to do with an image that cannot be decoded: skip it (and count it) or stop the job."
    )
    read_concurrency: int = Field(
        16,
        ge=1,
        le=256,
        description="Reads in flight in each decoding task: a batch's images (one GET each), or with "
        "`webdataset` / `parquet` its stretches of shards (one ranged GET each) or its files.",
    )
    read_retry_seconds: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="How long a read is retried (throttling, 5xx, lost connections) before the run stops "
        "with an I/O failure naming the image; a read failure never counts as a bad image.",
    )
    endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Endpoint of an S3-compatible store (MinIO, Ceph), e.g. `http://minio:9000`, used for every "
        "`s3://` URI of the job (data, manifest, weights, output); AWS S3 needs none.",
    )


class ModelSpec(_Section):
    arch: str = Field(
        description="torchvision classification builder, e.g. `resnet50`, `efficientnet_v2_s`, `vit_b_16`."
    )
    weights: str = Field(
        "DEFAULT",
        description="Initial weights: `DEFAULT`, a torchvision weights name (e.g. `IMAGENET1K_V2`), "
        "a checkpoint (`s3://…` or a path to a state_dict), a published run's folder or URI, `latest` (the job's "
        "current champion, see `publish`), or `none` for random init.",
    )
    mode: Literal["architecture", "feature_extractor", "partial"] = Field(
        "partial",
        description="`architecture`: random init, train everything; `feature_extractor`: freeze the whole "
        "pretrained backbone, train a new head; `partial`: freeze the first `freeze_depth` blocks.",
    )
    freeze_depth: FreezeDepth | None = Field(
        None,
        description="Number of backbone blocks (input side) to freeze, or `all`; required for `mode: partial`, "
        "implied by the other modes. `tlray validate` lists the arch's blocks.",
    )
    batchnorm: Literal["frozen", "train"] = Field(
        "frozen",
        description="`frozen`: BatchNorm layers in frozen blocks keep their running statistics; "
        "`train`: they keep updating them in train mode.",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        archs.family_of(arch)  # raises with a did-you-mean
        return arch

    @property
    def pretrained(self) -> bool:
        return self.weights.lower() != "none"

    @property
    def builder_weights(self) -> str | None:
        """What `tlray.models.build.build_model` takes: None for random init, else the weights name or checkpoint."""
        return self.weights if self.pretrained else None


class TrainSpec(_Section):
    epochs: int = Field(10, ge=1, le=10_000, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, le=65_536, description="Images per step on each worker.")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="`sgd` (momentum 0.9, Nesterov) or `adamw`.")
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="Weight decay of the optimizer.")
    scheduler: Literal["cosine", "onecycle", "constant"] = Field(
        "cosine", description="Learning-rate schedule over all steps, after the warm-up."
    )
    warmup_epochs: int = Field(0, ge=0, description="Epochs of linear warm-up from 0 to `lr`; less than `epochs`.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision: `auto` = bf16 (or fp16) on GPU, off on CPU."
    )
    seed: int = Field(0, description="Seed of weight init, shuffling and augmentation.")
    checkpoints_to_keep: int = Field(
        2,
        ge=1,
        le=100,
        description="Checkpoints kept in the run's storage: the best ones by `select_metric` (the most recent with "
        "`last`), plus always the latest, which a re-run resumes from.",
    )
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Discriminative learning rates (timm's layer decay, ULMFiT): a backbone block i blocks from the "
        "head trains at `lr` x layer_lr_decay^i, the head side at `lr`; every schedule scales each rate alike. "
        "1: one rate for the whole model.",
    )
    unfreeze_every: int | None = Field(
        None,
        ge=1,
        description="Gradual unfreezing (fastai's fine_tune, ULMFiT): start at `model.freeze_depth` and unfreeze the "
        "deepest frozen block (the one nearest the head) every this many epochs, down to `unfreeze_to`; the "
        "optimizer gains its parameters then. Only with `model.mode: partial`; unset: the depth stays fixed.",
    )
    unfreeze_to: int = Field(
        0,
        ge=0,
        description="The freeze depth gradual unfreezing stops at (`0`: in the end every block trains); "
        "below `model.freeze_depth`, only with `unfreeze_every`.",
    )
    cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Frozen-prefix cache: the frozen blocks' output is computed once per image, kept on the node's "
        "local disk ($TLRAY_CACHE_DIR, default <tmp>/tlray-cache), and every epoch trains only the blocks after "
        "it. `auto`: when the activations fit `cache_budget_gb`; `on`: always; `off`: the frozen blocks run every "
        "epoch (without autograd). Needs frozen blocks, `dataset.augment: false` and `model.batchnorm: frozen`; "
        "with `unfreeze_every` it serves the epochs before the first block unfreezes.",
    )
    cache_budget_gb: float = Field(
        8.0,
        gt=0,
        description="Disk that frozen-prefix cache entries may take on a node, all runs and trials together (older "
        "entries no process has open are removed to fit); `cache: auto` builds an entry only when it fits.",
    )
    cache_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="How cached activations are stored: the half types halve the cache; training then sees them "
        "rounded, so cached and uncached runs differ slightly.",
    )
    select_metric: str = Field(
        "val_accuracy",
        description=f"Which epoch a run publishes: the best by this metric (one of {', '.join(SELECTABLE)}; "
        "losses lower, others higher is better), or `last` for the final epoch. A search (`tune`) needs "
        "`tune.metric` here: the best trial publishes its epoch by the metric that ranked it.",
    )

    @field_validator("select_metric")
    @classmethod
    def _selectable_metric(cls, metric: str) -> str:
        if metric != "last" and metric not in SELECTABLE:
            raise ValueError(f"'{metric}' is never reported; choose `last` or one of {', '.join(SELECTABLE)}")
        return metric

    def freeze_depth_at(self, start: int, epoch: int) -> int:
        """The freeze depth of 0-based `epoch` in a run that starts at `start` blocks frozen: one block fewer every
        `unfreeze_every` epochs, down to `unfreeze_to`; `start` throughout without unfreezing."""
        if self.unfreeze_every is None or start <= self.unfreeze_to:
            return start
        return max(self.unfreeze_to, start - epoch // self.unfreeze_every)


class ScalingSpec(_Section):
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (one process each, data-parallel).")
    use_gpu: bool = Field(False, description="Train on GPUs (NCCL); otherwise CPUs (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves.")
    gpus_per_worker: float = Field(
        1.0,
        ge=0,
        description="GPUs each worker reserves when `use_gpu` is true: 1 (a worker trains on one GPU), or a "
        "fraction with `num_workers: 1` (the trials of a search then share GPUs); NCCL refuses two workers on one GPU.",
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Worker failures to recover from (restart from the last checkpoint); -1 = unlimited. In a "
        "search, per trial.",
    )
    placement: Literal["pack", "spread"] = Field(
        "pack",
        description="`pack` puts workers on as few nodes as fit (fast all-reduce); `spread`, one per node where it "
        "can (a lost node takes fewer workers); either way a run restarted after losing a node uses what is left.",
    )


class LrRange(_Section):
    min: float = Field(gt=0, description="Lowest learning rate tried.")
    max: float = Field(gt=0, description="Highest learning rate tried.")


class TuneSpec(_Section):
    num_samples: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Trials to run, this many in all. The `freeze_depth` choices take turns (the first trial tries "
        "the first choice, ...), so each gets at least one trial; `lr` is sampled anew for every trial.",
    )
    lr: LrRange | None = Field(
        None, description="Learning-rate range, sampled log-uniformly; default: `train.lr` only."
    )
    freeze_depth: list[SearchChoice] | None = Field(
        None,
        min_length=1,
        description="Freeze depths to try from `model.weights` (`mode: partial`), each once at least: a number of "
        "blocks, `all`, or `random` for the architecture alone, trained from random init with nothing frozen "
        "(as `mode: architecture`; without `train.unfreeze_every` and `layer_lr_decay`, which serve pretrained "
        "blocks); default: `model.freeze_depth` only.",
    )
    scheduler: Literal["asha", "hyperband", "none"] = Field(
        "asha",
        description="`asha` stops weak trials early (asynchronous: a trial never waits for others); `hyperband`: "
        "synchronous successive halving (Ray Tune's HyperBandScheduler): a trial that reaches a rung pauses "
        "until every trial of its bracket has, then the best go on; `none` runs all.",
    )
    grace_period: int = Field(
        1,
        ge=1,
        description="Epochs every trial runs before ASHA may stop it. Not used by `hyperband`, whose "
        "brackets set their own first rungs (see `reduction_factor`).",
    )
    reduction_factor: int = Field(
        3,
        ge=2,
        description="ASHA keeps the best 1/`reduction_factor` of the trials at each rung "
        "(epochs grace, grace x factor, ...). HyperBand keeps as many at each rung of a bracket; "
        "its brackets' first rungs are `train.epochs` / factor^k epochs (k = 0, 1, ...), so it stops "
        "no trial early when `train.epochs` < factor.",
    )
    metric: str = Field(
        "val_accuracy",
        description=f"Metric that ranks the trials: one of {', '.join(SELECTABLE)}; "
        "`train.select_metric` must be the same.",
    )
    mode: Literal["max", "min"] = Field(
        "max", description="Whether a higher (`max`) or lower (`min`) metric is better: `min` for the losses."
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once; default: as many as the cluster's resources allow."
    )

    @field_validator("metric")
    @classmethod
    def _reported_metric(cls, metric: str) -> str:
        if metric not in SELECTABLE:
            raise ValueError(f"'{metric}' is never reported; choose one of {', '.join(SELECTABLE)}")
        return metric


class PublishSpec(_Section):
    policy: Literal["gate", "always", "never"] = Field(
        "gate",
        description="When a finished run becomes the champion that `<output.uri>/<name>/latest.json` points at: "
        "`gate`: only if it beats the current champion on the new run's validation split by `min_improvement`; "
        "`always`: every finished run; `never`: the pointer is left alone.",
    )
    metric: Literal[GATEABLE] = Field(
        "val_accuracy",
        description="Metric the gate compares, computed for the new run and the champion on the new run's "
        "validation split (`val_loss` lower is better, the others higher).",
    )
    min_improvement: float = Field(
        0.0,
        ge=0,
        description="How much better than the champion a run must be to replace it under `gate` "
        "(absolute, in the metric's units); with 0 it must still be strictly better.",
    )


class OutputSpec(_Section):
    uri: str = Field(
        description="Where runs and published models go: `s3://bucket/prefix` or a local folder; "
        "a run writes `<uri>/<name>/runs/<run_id>/`."
    )


class MlflowSpec(_Section):
    uri: str | None = Field(
        None,
        description="The MLflow tracking server, e.g. `http://mlflow:5000` (its REST API; artifacts go through its "
        "proxy, the default of `mlflow server`); default: the MLFLOW_TRACKING_URI environment variable.",
    )
    experiment: str | None = Field(None, description="The MLflow experiment the runs go to; default: the job's name.")
    log_weights: bool = Field(
        False,
        description="Also upload the published model's files (model.pt2, state_dict.pt) as artifacts of the MLflow "
        "run; otherwise the registry points at the published model in `output.uri`.",
    )

    @property
    def server(self) -> str | None:
        """`uri`, else MLFLOW_TRACKING_URI, read where it is asked: validate, and the driver, which hands the
        workers the MLflow run itself. The spec keeps `uri` as written (render copies it into the cluster)."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class TrackingSpec(_Section):
    mlflow: MlflowSpec | None = Field(
        None,
        description="Log runs, metrics and published models to MLflow, and register each published model "
        "(alias `champion` on the gate's champion). A server that is down never stops a run.",
    )


class JobSpec(_Section):
    name: str = Field(
        description=f"Job name: it names run folders and Kubernetes objects, so a DNS-1035 label (lowercase "
        f"letters, digits, '-'; starting with a letter) of at most {names.MAX_NAME_LENGTH} characters, which "
        f"leaves room for the names derived from it; a RayCronJob allows {names.RAYCRONJOB_MAX}."
    )
    dataset: DatasetSpec = Field(description="The labelled images.")
    model: ModelSpec = Field(description="The network, its initial weights and what is frozen.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="How many Ray Train workers, on what.")
    tune: TuneSpec | None = Field(
        None, description="Hyper-parameter search over `lr` and `freeze_depth` or random init (`tlray tune`)."
    )
    output: OutputSpec = Field(description="Where the results go.")
    publish: PublishSpec = Field(
        default_factory=PublishSpec, description="Champion gate: which finished runs `latest.json` points at."
    )
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment tracking beside the run's own record; not part of the run's identity (its id).",
    )

    @field_validator("name")
    @classmethod
    def _kubernetes_name(cls, name: str) -> str:
        problem = names.name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    # -- derived values: computed here once, used everywhere -------------------------------
    @property
    def freeze_depth(self) -> int:
        """The number of frozen backbone blocks this spec trains with."""
        if self.model.mode == "architecture":
            return 0
        if self.model.mode == "feature_extractor":
            return len(archs.backbone_block_names(self.model.arch))
        return archs.resolve_freeze_depth(self.model.arch, self.model.freeze_depth)

    @property
    def trial_choices(self) -> list[int | str | None]:
        """A search's trials, in the order Tune creates them, as the `tune.freeze_depth` choice each tries: the
        choices take turns, so `tune.num_samples` trials try every choice (a rule refuses fewer trials than
        choices) and the first ones once more. Without a list, every trial trains at `model.freeze_depth`."""
        if self.tune is None:
            return []
        choices = self.tune.freeze_depth or [self.model.freeze_depth]
        return [choices[i % len(choices)] for i in range(self.tune.num_samples)]

    @property
    def job_uri(self) -> str:
        """`<output.uri>/<name>`: the job's runs, champion pointer and decision history. A local output
        is made absolute, since workers run in other directories (as storage.absolute_uri does)."""
        output = self.output.uri if "://" in self.output.uri else str(Path(self.output.uri).expanduser().resolve())
        return f"{output.rstrip('/')}/{self.name}"

    @property
    def fingerprint(self) -> str:
        """Short hash of the whole spec but `tracking`: where a run is logged does not make it another run
        (a resumed run with tracking added goes on from its checkpoints)."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"tracking"}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:8]

    def run_id_for(self, command: str, data_fingerprint: str) -> str:
        """`<name>-<hash>` for `tlray train`, `<name>-search-<hash>` for `tlray tune`.

        The hash covers the spec and the data: the same spec on the same images maps to the same
        run (a re-run resumes, a finished one re-publishes), while new or changed images (the next
        scheduled retraining) start a new run.
        """
        digest = hashlib.sha256(f"{self.fingerprint}:{data_fingerprint}".encode()).hexdigest()[:8]
        return f"{self.name}-{digest}" if command == "train" else f"{self.name}-search-{digest}"


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    key: str  # dotted path, e.g. "model.freeze_depth"
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class SpecError(UserError):
    def __init__(self, source: str, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun} in the job spec:\n{lines}")


# ---------------------------------------------------------------------------------------
# Cross-field rules. Each takes the validated sections it names and yields problems.
# ---------------------------------------------------------------------------------------
Rule = Callable[..., Iterable[Problem]]
RULES: list[tuple[tuple[str, ...], Rule]] = []


def rule(*sections: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES.append((sections, fn))
        return fn

    return register


@rule("dataset")
def _manifest_matches_layout(dataset: DatasetSpec):
    if dataset.layout == "manifest" and not dataset.manifest:
        yield Problem("dataset.manifest", "required with `layout: manifest` (a CSV or JSONL index)")
    if dataset.layout != "manifest" and dataset.manifest:
        yield Problem("dataset.manifest", "only used with `layout: manifest`; remove it or set `layout: manifest`")


@rule("dataset")
def _shard_keys_match_layout(dataset: DatasetSpec):
    if dataset.classes is not None and dataset.layout not in ("webdataset", "parquet"):
        yield Problem(
            "dataset.classes", f"only used with `layout: webdataset` or `parquet` (layout is '{dataset.layout}')"
        )
    if dataset.classes is not None:
        repeated = sorted({name for name in dataset.classes if dataset.classes.count(name) > 1})
        if repeated:
            yield Problem("dataset.classes", f"names a class twice: {', '.join(repeated)}")
        if any(not name.strip() for name in dataset.classes):
            yield Problem("dataset.classes", "has an empty class name")
    for key in ("image_column", "label_column"):
        if key in dataset.model_fields_set and dataset.layout != "parquet":
            yield Problem(f"dataset.{key}", f"only used with `layout: parquet` (layout is '{dataset.layout}')")
    if dataset.image_column == dataset.label_column:
        yield Problem("dataset.label_column", f"is the image column too ('{dataset.image_column}')")


def _location_problem(key: str, value: str | None) -> Iterable[Problem]:
    scheme = value.split("://", 1)[0] if value and "://" in value else None
    if scheme is not None and scheme != "s3":
        yield Problem(key, f"'{value}': tlray reads and writes `s3://` URIs and local paths only, not {scheme}://")


@rule("dataset")
def _dataset_locations(dataset: DatasetSpec):
    yield from _location_problem("dataset.uri", dataset.uri)
    yield from _location_problem("dataset.manifest", dataset.manifest)


@rule("model")
def _weights_location(model: ModelSpec):
    yield from _location_problem("model.weights", model.weights)


@rule("output")
def _output_location(output: OutputSpec):
    yield from _location_problem("output.uri", output.uri)


@rule("dataset")
def _endpoint_needs_s3(dataset: DatasetSpec):
    if dataset.endpoint_url and not dataset.uri.startswith("s3://"):
        yield Problem("dataset.endpoint_url", "only applies to an `s3://` dataset.uri")


@rule("model")
def _weights_match_mode(model: ModelSpec):
    if model.mode == "architecture" and model.pretrained:
        yield Problem(
            "model.weights",
            f"mode 'architecture' trains from random init, so weights must be `none` (got '{model.weights}')",
        )
    if model.mode in ("feature_extractor", "partial") and not model.pretrained:
        yield Problem(
            "model.weights", f"mode '{model.mode}' needs pretrained weights; use `mode: architecture` for random init"
        )


@rule("model")
def _weights_exist(model: ModelSpec):
    w = model.weights
    if not model.pretrained or w.startswith("s3://") or w == "latest":  # latest: the champion (artifacts.champion)
        return
    if w in archs.weights_names(model.arch):
        return
    if "/" in w or w.endswith((".pt", ".pth", ".bin")):
        return  # a checkpoint path: whether it exists here is checked when a job starts, like the data
    known = archs.weights_names(model.arch)
    yield Problem(
        "model.weights",
        f"'{w}' is not a weights name of {model.arch} ({', '.join(known)}), a checkpoint path or `none`",
    )


@rule("dataset", "model")
def _image_size_fits_the_model(dataset: DatasetSpec, model: ModelSpec):
    # ViT runs at the one size its position embedding was built for; refused here, before any cluster work
    if dataset.image_size is not None:
        problem = archs.image_size_problem(model.arch, model.builder_weights, dataset.image_size)
        if problem:
            yield Problem("dataset.image_size", problem)


@rule("model")
def _freeze_depth_matches_mode(model: ModelSpec):
    depth, blocks = model.freeze_depth, archs.backbone_block_names(model.arch)
    if model.mode == "architecture" and depth not in (None, 0):
        yield Problem(
            "model.freeze_depth", "mode 'architecture' trains every block from random init; remove freeze_depth"
        )
    elif model.mode == "feature_extractor" and depth not in (None, "all", len(blocks)):
        yield Problem(
            "model.freeze_depth",
            f"mode 'feature_extractor' freezes all {len(blocks)} blocks; use mode 'partial' for {depth}",
        )
    elif model.mode == "partial":
        if depth is None:
            yield Problem(
                "model.freeze_depth",
                f"required with mode 'partial': 0..{len(blocks)} or `all` ({_describe_blocks(blocks)})",
            )
        else:
            yield from _depth_problems("model.freeze_depth", model.arch, depth)


@rule("train")
def _warmup_shorter_than_training(train: TrainSpec):
    if train.warmup_epochs >= train.epochs:
        yield Problem(
            "train.warmup_epochs", f"must be less than train.epochs ({train.warmup_epochs} >= {train.epochs})"
        )


@rule("train", "dataset", "model", "tune")
def _cache_on_needs_a_pure_prefix(train: TrainSpec, dataset: DatasetSpec, model: ModelSpec, tune: TuneSpec | None):
    if train.cache != "on":
        return
    if dataset.augment:
        yield Problem("train.cache", "`on` needs `dataset.augment: false`: random crops change the frozen output")
    if model.batchnorm == "train":
        yield Problem(
            "train.cache", "`on` needs `model.batchnorm: frozen`: training statistics change the frozen output"
        )
    depths = tune.freeze_depth if tune and tune.freeze_depth else [model.freeze_depth]
    if model.mode == "architecture" or all(depth in (0, RANDOM_INIT) for depth in depths):
        yield Problem("train.cache", "`on` needs frozen blocks (freeze_depth >= 1); nothing is frozen here")


def _start_depths(model: ModelSpec, tune: TuneSpec | None) -> list[int]:
    """The freeze depths a run (or a search's trials) may start at, those that are valid for the arch. A search's
    `random` trials start from no weights, where unfreezing and layer decay have nothing to do: not counted."""
    blocks = archs.backbone_block_names(model.arch)
    if model.mode != "partial":
        return [0 if model.mode == "architecture" else len(blocks)]
    depths = tune.freeze_depth if tune and tune.freeze_depth else [model.freeze_depth]
    resolved = [_resolved_choice(depth, len(blocks)) for depth in depths if depth not in (None, RANDOM_INIT)]
    return [depth for depth in resolved if 0 <= depth <= len(blocks)]


def _resolved_choice(choice: int | str, blocks: int) -> int:
    """A search choice as the blocks it freezes: `random` freezes none (it trains every block from random init)."""
    return {"all": blocks, RANDOM_INIT: 0}.get(choice, choice)


@rule("train", "model", "tune")
def _unfreezing_has_blocks_to_unfreeze(train: TrainSpec, model: ModelSpec, tune: TuneSpec | None):
    every, to = train.unfreeze_every, train.unfreeze_to
    if every is None:
        if to:
            yield Problem("train.unfreeze_to", "only used with `train.unfreeze_every`; set it or remove unfreeze_to")
        return
    if model.mode != "partial":
        reason = {
            "architecture": "trains every block from random init: nothing is frozen",
            "feature_extractor": "keeps the whole backbone frozen; to unfreeze from the head (ULMFiT), use "
            "`mode: partial` with `freeze_depth: all`",
        }[model.mode]
        yield Problem("train.unfreeze_every", f"needs `model.mode: partial`; mode '{model.mode}' {reason}")
        return
    blocks = archs.backbone_block_names(model.arch)
    if to >= len(blocks):
        yield Problem(
            "train.unfreeze_to", f"{to} is outside 0..{len(blocks) - 1} for {model.arch} ({_describe_blocks(blocks)})"
        )
        return
    starts = _start_depths(model, tune)
    if starts and max(starts) <= to:
        depths = "every tune.freeze_depth" if tune and tune.freeze_depth else f"model.freeze_depth {max(starts)}"
        yield Problem("train.unfreeze_to", f"{to} is not below {depths}: no block would unfreeze")
    if every >= train.epochs:
        yield Problem(
            "train.unfreeze_every",
            f"must be less than train.epochs ({every} >= {train.epochs}): no block would unfreeze",
        )


@rule("train")
def _cache_on_until_unfreezing(train: TrainSpec):
    if train.cache == "on" and train.unfreeze_every is not None:
        yield Problem(
            "train.cache",
            "`on` cannot hold with train.unfreeze_every: a block that unfreezes changes the frozen output, so the "
            "cache stops at the first unfreezing; use `auto` (cached until then) or `off`",
        )


@rule("train", "model", "tune")
def _layer_decay_needs_trained_blocks(train: TrainSpec, model: ModelSpec, tune: TuneSpec | None):
    if train.layer_lr_decay == 1:
        return
    blocks = archs.backbone_block_names(model.arch)
    starts = _start_depths(model, tune)
    lowest = min(starts, default=0)
    if model.mode == "partial" and train.unfreeze_every is not None:
        if train.unfreeze_to >= len(blocks):
            return  # beyond the block map: its own rule says so
        lowest = min(lowest, train.unfreeze_to)
    if lowest >= len(blocks):
        only = "mode 'feature_extractor'" if model.mode == "feature_extractor" else "freeze_depth `all`"
        yield Problem(
            "train.layer_lr_decay",
            f"{only} trains only the head, at train.lr: no block's rate would decay; remove layer_lr_decay, "
            "or train blocks (`mode: partial` with a lower freeze_depth, or train.unfreeze_every)",
        )


@rule("train", "scaling")
def _fp16_needs_gpu(train: TrainSpec, scaling: ScalingSpec):
    if train.amp == "fp16" and not scaling.use_gpu:
        yield Problem("train.amp", "fp16 autocast needs `scaling.use_gpu: true`; use bf16 or off on CPU")


@rule("scaling")
def _one_gpu_per_worker(scaling: ScalingSpec):
    gpus, workers = scaling.gpus_per_worker, scaling.num_workers
    if not scaling.use_gpu:
        return
    if gpus <= 0:
        yield Problem("scaling.gpus_per_worker", "must be > 0 when `scaling.use_gpu` is true")
    elif gpus > 1:  # each worker is one rank on one device: the other GPUs would be reserved and never used
        yield Problem(
            "scaling.gpus_per_worker",
            f"{gpus:g}: a worker trains on one GPU, so the rest would sit idle; set 1 and raise scaling.num_workers",
        )
    elif gpus < 1 and workers > 1:  # Ray may then place two of the run's workers on one GPU
        yield Problem(
            "scaling.gpus_per_worker",
            f"{gpus:g} with scaling.num_workers {workers}: two workers of a run may share a GPU, which NCCL refuses; "
            "set 1, or use a fraction with num_workers: 1 (trials of a search then share GPUs)",
        )


@rule("tune")
def _lr_bounds_ordered(tune: TuneSpec | None):
    if tune and tune.lr and tune.lr.min >= tune.lr.max:
        yield Problem("tune.lr", f"min ({tune.lr.min:g}) must be below max ({tune.lr.max:g})")


@rule("tune", "model")
def _tuned_depths_in_block_map(tune: TuneSpec | None, model: ModelSpec):
    if not tune or not tune.freeze_depth:
        return
    if model.mode != "partial":
        yield Problem("tune.freeze_depth", f"searching freeze depths needs `model.mode: partial` (got '{model.mode}')")
        return
    blocks, seen = len(archs.backbone_block_names(model.arch)), {}
    for i, depth in enumerate(tune.freeze_depth):
        if depth != RANDOM_INIT:
            yield from _depth_problems(f"tune.freeze_depth[{i}]", model.arch, depth)
        same = (depth == RANDOM_INIT, _resolved_choice(depth, blocks))  # `all` and the block count are one depth
        if same in seen:
            first = seen[same]
            yield Problem(
                f"tune.freeze_depth[{i}]",
                f"{depth} repeats tune.freeze_depth[{first}] ({tune.freeze_depth[first]}): each choice gets "
                "its share of tune.num_samples, so list it once",
            )
        seen.setdefault(same, i)


@rule("tune")
def _every_choice_gets_a_trial(tune: TuneSpec | None):
    if not tune or not tune.freeze_depth or tune.num_samples >= len(tune.freeze_depth):
        return
    yield Problem(
        "tune.num_samples",
        f"{tune.num_samples} trials cannot try the {len(tune.freeze_depth)} choices of tune.freeze_depth "
        f"({', '.join(map(str, tune.freeze_depth))}); set tune.num_samples to {len(tune.freeze_depth)} or more, "
        "or list fewer choices",
    )


@rule("tune", "train")
def _search_publishes_by_its_ranking(tune: TuneSpec | None, train: TrainSpec):
    # One metric both ranks the trials and picks the epoch the best trial publishes. Refused up front rather than
    # publishing by tune.metric: train.select_metric also decides which checkpoints a run keeps
    # (checkpoints_to_keep), so only with the two equal is the ranked epoch sure to be on disk, and the same
    # spec under `tlray train` publishes the epoch the search saw. One rule, one meaning of select_metric.
    if tune is None:
        return
    if train.select_metric != tune.metric:
        yield Problem(
            "train.select_metric",
            f"'{train.select_metric}' differs from tune.metric '{tune.metric}': a search ranks trials by "
            "tune.metric, so the best trial must publish its epoch by it too; set both to the same metric",
        )
    direction = metric_mode(tune.metric)
    if tune.mode != direction:
        yield Problem(
            "tune.mode",
            f"'{tune.mode}' would rank trials by their worst {tune.metric}, while each trial publishes its best "
            f"epoch; {tune.metric} needs `{direction}`",
        )


@rule("publish")
def _min_improvement_needs_gate(publish: PublishSpec):
    if publish.min_improvement and publish.policy != "gate":
        yield Problem("publish.min_improvement", f"only used with `policy: gate` (policy is '{publish.policy}')")


@rule("tracking")
def _tracking_server_known(tracking: TrackingSpec):
    mlflow = tracking.mlflow
    if mlflow is None:
        return
    if not mlflow.server:
        yield Problem(
            "tracking.mlflow.uri",
            "no tracking server: set it (e.g. `http://mlflow:5000`) or the MLFLOW_TRACKING_URI environment variable",
        )
    elif not re.match(r"^https?://[^/:]+", mlflow.server):
        where = "" if mlflow.uri else " (from MLFLOW_TRACKING_URI)"
        yield Problem(
            "tracking.mlflow.uri", f"'{mlflow.server}'{where}: tlray talks to a tracking server over http(s):// only"
        )


@rule("tune", "train")
def _grace_period_within_epochs(tune: TuneSpec | None, train: TrainSpec):
    if tune and tune.grace_period > train.epochs:
        yield Problem("tune.grace_period", f"must not exceed train.epochs ({tune.grace_period} > {train.epochs})")


def _describe_blocks(blocks: list[str]) -> str:
    shown = ", ".join(blocks) if len(blocks) <= 10 else ", ".join(blocks[:4] + ["…"] + blocks[-3:])
    return f"blocks: {shown}"


def _depth_problems(key: str, arch: str, depth: int | str):
    blocks = archs.backbone_block_names(arch)
    if depth != "all" and not 0 <= depth <= len(blocks):
        yield Problem(key, f"{depth} is outside 0..{len(blocks)} for {arch} ({_describe_blocks(blocks)})")


# ---------------------------------------------------------------------------------------
# Loading: file -> raw mapping -> overrides -> validated JobSpec (or every problem at once)
# ---------------------------------------------------------------------------------------
def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> JobSpec:
    """Read, override and validate a spec file; raise SpecError listing every problem."""
    raw = read_yaml_mapping(path)
    problems = apply_overrides(raw, overrides)
    if problems:
        raise SpecError(str(path), problems)
    return validate_spec(raw, source=str(path))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{path}: the spec file is empty; see `jobs/` for examples")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raise UserError(f"{path}: the spec file holds only comments; see `jobs/` for examples")
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a job spec is a YAML mapping (name:, dataset:, model:, …), got a {type(raw).__name__}"
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> list[Problem]:
    """Apply `key.path=value` overrides in place; the value is parsed as YAML (`0.1`, `true`, `[1, 2]`)."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem("--set", f"'{item}' is not of the form key.path=value"))
            continue
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(Problem(key, f"cannot set a key inside '{part}', which is not a mapping"))
                break
        else:
            try:
                node[leaf] = yaml.safe_load(value) if value else ""
            except yaml.YAMLError:
                node[leaf] = value
    return problems


def validate_spec(raw: dict[str, Any], source: str = "spec") -> JobSpec:
    problems = _credential_problems(raw, "")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        spec = None
        credential_keys = {p.key for p in problems}
        problems += [p for p in map(_problem_from_pydantic, exc.errors()) if p.key not in credential_keys]
    problems += _rule_problems(raw)
    if problems:
        raise SpecError(source, _unique(problems))
    return spec


def _credential_problems(node: Any, prefix: str) -> list[Problem]:
    problems = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if CREDENTIAL_KEY.search(str(key)):
                problems.append(
                    Problem(
                        dotted,
                        "looks like a credential; tlray never reads secrets from a spec. Use the standard AWS "
                        "credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY env vars, ~/.aws profiles), "
                        "a Kubernetes Secret, or IRSA / EKS Pod Identity",
                    )
                )
            else:
                problems += _credential_problems(value, dotted)
    return problems


def _problem_from_pydantic(err: dict[str, Any]) -> Problem:
    loc = [part for part in err["loc"] if not _is_union_tag(part)]
    key = _dotted(loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
        return Problem(key, f"unknown key{hint}")
    if err["type"] == "missing":
        return Problem(key, "required key is missing")
    message = err["msg"].removeprefix("Value error, ").removeprefix(f"{key}: ")
    if "input" in err and err["type"] not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    return Problem(key, message)


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member it tried ("int", "literal['all']") to the location
    tags = ("int", "float", "str", "bool", "LrRange", "TuneSpec", "MlflowSpec")
    return isinstance(part, str) and (part in tags or "[" in part)


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(loc: list[Any]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = next(
            (
                t
                for t in (annotation, *getattr(annotation, "__args__", ()))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            model,
        )
    return list(model.model_fields)


def _rule_problems(raw: dict[str, Any]) -> list[Problem]:
    """Run every rule whose sections validate on their own (so rule errors show beside type errors)."""
    sections: dict[str, Any] = {}
    for name, field in JobSpec.model_fields.items():
        if name == "name":
            continue
        value = raw.get(name)
        if value is None and field.is_required():
            continue
        try:
            sections[name] = (
                _section_model(field.annotation).model_validate(value)
                if value is not None
                else field.get_default(call_default_factory=True)
            )
        except (ValidationError, UserError):
            pass
    problems = []
    for needed, fn in RULES:
        if all(s in sections for s in needed):
            try:
                problems += list(fn(*(sections[s] for s in needed)))
            except UserError as exc:  # e.g. an arch-dependent lookup that fails for this arch
                problems.append(Problem(needed[0], str(exc)))
    return problems


def _section_model(annotation: Any) -> type[BaseModel]:
    return next(
        t
        for t in (annotation, *getattr(annotation, "__args__", ()))
        if isinstance(t, type) and issubclass(t, BaseModel)
    )


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------------------------------
# Reference documentation, generated from the field descriptions (README embeds it)
# ---------------------------------------------------------------------------------------
def reference_markdown() -> str:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            section = _nested_section(field.annotation)
            default = "required" if field.is_required() else _default_text(field)
            lines.append(f"| `{key}` | {_type_text(field.annotation)} | {default} | {field.description} |")
            if section is not None:
                walk(section, f"{key}.")

    walk(JobSpec, "")
    return "\n".join(lines) + "\n"


def _nested_section(annotation: Any) -> type[BaseModel] | None:
    for t in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _default_text(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _type_text(annotation: Any) -> str:
    """A reader's name for a field type: `int \\| 'all'`, `'sgd' \\| 'adamw'`, `list of …`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_text(a) for a in args)
    if origin is list:
        return f"list of ({_type_text(args[0])})"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))
