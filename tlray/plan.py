"""The run plan: everything a run needs, resolved once on the driver into one immutable object.

It is the whole contract between the driver and what runs elsewhere. Ray Train's workers get it as their only
config; a search's trials get it with their own hyper-parameters (`for_trial`); publishing reads the run's
classes, preprocessing, freeze summary and data from it. The driver builds the model once, to check that the
weights load and to count what the freeze depth freezes (tlray.flows.steps); the workers build their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlray import archs
from tlray.archs import ModelError
from tlray.data.pipeline import DataSource
from tlray.data.preprocessing import Preprocessing
from tlray.io import storage
from tlray.io.mlflow import TrackedRun, flatten
from tlray.models.build import build_model, torchvision_weights, weights_enum
from tlray.models.freeze import FreezeSummary, freeze
from tlray.spec import JobSpec

TRAIN_RUN = "train"  # the Ray Train run of `tlray train`, under its run folder (a trial's is named after it)


@dataclass(frozen=True)
class Weights:
    """The starting weights: where workers load them from, and which version the run was planned with."""

    location: str  # an absolute path, an s3:// URI, or a torchvision weights name
    identity: str  # "etag <ETag>[ version <id>]" of an S3 object, "sha256 <hex>" of a file, or the name itself


@dataclass(frozen=True)
class RunPlan:
    spec: JobSpec  # validated; `model.weights: latest` resolved to the champion's checkpoint
    run_uri: str  # <output.uri>/<name>/runs/<run id>
    weights: Weights | None  # None: random init
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    freeze: FreezeSummary  # of spec.freeze_depth, counted on the driver's model
    data: DataSource  # the dataset's keys in Ray's object store, and how to read them
    checkpoints_uri: str  # this trainer's Ray Train storage: <run>/train, or a trial's <run>/trials/<trial id>
    runs_at_once: int = 1  # trainers sharing the cluster (a search's concurrent trials)
    tracking: TrackedRun | None = None  # the MLflow run it logs to (a search's, then each trial's own); None: none

    def tracking_params(self) -> dict[str, Any]:
        """What its MLflow run records as params: the resolved spec as dotted keys (`train.lr`; `tracking` is not
        part of the run), the identity of the starting weights and the data's fingerprint."""
        spec = self.spec.model_dump(mode="json", exclude={"tracking"})
        identity = self.weights_identity or "none"
        return {**flatten(spec), "weights_identity": identity, "data_fingerprint": self.data.fingerprint}

    @property
    def weights_identity(self) -> str | None:
        """Which version of the starting weights the run was planned with; None from random init."""
        return self.weights.identity if self.weights else None

    @property
    def run_id(self) -> str:
        return self.run_uri.rsplit("/", 1)[-1]

    @property
    def endpoint_url(self) -> str | None:
        return self.spec.dataset.endpoint_url

    def for_trial(self, spec: JobSpec, trial_id: str, runs_at_once: int) -> RunPlan:
        """A search's trial: its spec (the search's with the trial's lr and freeze depth, or the architecture alone
        for `random`), its starting weights (None from random init), its freeze depth counted on a parameter-less
        model, and its own checkpoints."""
        return dataclasses.replace(
            self,
            spec=spec,
            weights=self.trial_weights(spec),
            freeze=freeze_summary(spec, shape_only_model(spec, len(self.classes))),
            checkpoints_uri=self.trial_checkpoints_uri(trial_id),
            runs_at_once=runs_at_once,
        )

    def for_best_trial(self, spec: JobSpec, model: nn.Module, trial_id: str) -> RunPlan:
        """What publishing the best trial needs: its spec, its starting weights, its checkpoints, and its freeze
        depth counted on the driver's model."""
        checkpoints = self.trial_checkpoints_uri(trial_id)
        return dataclasses.replace(
            self,
            spec=spec,
            weights=self.trial_weights(spec),
            freeze=freeze_summary(spec, model),
            checkpoints_uri=checkpoints,
        )

    def trial_weights(self, spec: JobSpec) -> Weights | None:
        """The search's weights (resolved once, on the driver), or None for a trial that starts from random init."""
        return self.weights if spec.model.pretrained else None

    def trial_checkpoints_uri(self, trial_id: str) -> str:
        return storage.join(self.run_uri, "trials", trial_id)


def plan_run(spec: JobSpec, source: DataSource, run_uri: str, model: nn.Module) -> RunPlan:
    """The plan of `tlray train` (and of a search, whose trials each derive their own). `model`: the driver's."""
    return RunPlan(
        spec=spec,
        run_uri=run_uri,
        weights=weights_of(spec),
        classes=tuple(source.classes),
        preprocessing=source.preprocessing,
        freeze=freeze_summary(spec, model),
        data=source,
        checkpoints_uri=storage.join(run_uri, TRAIN_RUN),
    )


def freeze_summary(spec: JobSpec, model: nn.Module) -> FreezeSummary:
    """What `spec` freezes, counted on `model` (freezing it: a later call re-freezes it from scratch)."""
    return freeze(model, spec.model.arch, spec.freeze_depth, spec.model.batchnorm)


def shape_only_model(spec: JobSpec, num_classes: int) -> nn.Module:
    """The spec's architecture on PyTorch's meta device: its parameters' shapes, no memory and no init to wait for,
    enough to count what a freeze depth freezes."""
    with torch.device("meta"):
        return build_model(spec.model.arch, None, num_classes)


def weights_of(spec: JobSpec) -> Weights | None:
    """Where the workers read the starting weights, and the identity of what is there now."""
    from tlray.io import weights

    name = spec.model.builder_weights
    if not name:
        return None
    if storage.is_s3(name):
        stored = weights.head(name, spec.dataset.endpoint_url)
        return Weights(name, weights.identity(stored))
    if Path(name).is_file():  # workers run in other directories
        location = storage.absolute_uri(name)
        return Weights(location, f"sha256 {storage.sha256_of(location)}")
    return Weights(name, name)  # torchvision's weights, by name


def preprocessing(arch: str, image_size: int | None, weights: str | None = None) -> Preprocessing:
    """The preset of the weights the model starts from (reading it downloads nothing): resnet50's IMAGENET1K_V1
    resizes to 256, its V2 to 232; SWAG weights crop 384 or more, bicubic. `weights` is the spec's name for them
    ("IMAGENET1K_V2", "ResNet50_Weights.DEFAULT"); for a checkpoint or None (random init) the DEFAULT preset.

    image_size replaces the crop size and scales the resize size by the same ratio. Left out, a ViT without
    torchvision weights takes the size it is built for, not DEFAULT's (vit_h_14's DEFAULT is 518 px).
    """
    member = torchvision_weights(arch, weights) if weights else None
    preset = (member or weights_enum(arch).DEFAULT).transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ModelError(f"dataset.image_size: need a positive number of pixels, got {image_size!r}")
        problem = archs.image_size_problem(arch, weights, image_size)
        if problem:
            raise ModelError(f"dataset.image_size: {problem}")
    size = image_size or archs.fixed_input_size(arch, weights) or crop
    crop, resize = size, round(resize * size / crop)
    return Preprocessing(
        resize_size=resize,
        crop_size=crop,
        mean=tuple(float(x) for x in preset.mean),
        std=tuple(float(x) for x in preset.std),
        interpolation=preset.interpolation.value,
    )
