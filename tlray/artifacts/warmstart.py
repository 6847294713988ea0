"""`model.weights: latest` (or a published run): start training from the current champion.

The champion is resolved once, on the driver, to a plain state_dict checkpoint, which the spec then
names: so the run id, metadata.json and every worker see which weights were used, not the word
"latest". Classes must match the champion's, by name: a class the dataset no longer has is an error
naming it; new classes get new head rows (the champion's rows are kept for the classes it knows).
"""

from __future__ import annotations

import hashlib
import io

import torch

from tlray.artifacts import champion
from tlray.artifacts.manifest import MANIFEST
from tlray.artifacts.published import PublishedModel, load_published
from tlray.data.index import DatasetIndex
from tlray.errors import UserError
from tlray.io import storage
from tlray.spec import JobSpec

LATEST = "latest"


def is_published_run(weights: str, endpoint_url: str | None) -> bool:
    """`latest`, a latest.json, or a folder (local or S3) rather than a checkpoint file."""
    if weights == LATEST or weights.endswith(champion.LATEST):
        return True
    if storage.is_s3(weights):
        return not weights.endswith((".pt", ".pth", ".bin")) and storage.exists(
            storage.join(weights, MANIFEST), endpoint_url
        )
    fs, path = storage.filesystem(weights)
    return fs.get_file_info(path).type == storage.pafs.FileType.Directory


def resolve(spec: JobSpec, index: DatasetIndex) -> JobSpec:
    """The spec with `model.weights` pointing at a checkpoint made from the champion (or the given run)."""
    weights, endpoint = spec.model.weights, spec.dataset.endpoint_url
    if not spec.model.pretrained or not is_published_run(weights, endpoint):
        return spec
    uri = champion.latest_uri(spec.job_uri) if weights == LATEST else weights
    try:
        model = load_published(uri, endpoint)
    except UserError as exc:
        raise UserError(f"model.weights: {str(exc).removeprefix('MODEL: ')}") from None
    if model.metadata["arch"] != spec.model.arch:
        raise UserError(f"model.weights: {model.run} is a {model.metadata['arch']}, not a {spec.model.arch}")
    removed = [c for c in model.classes if c not in index.classes]
    if removed:
        raise UserError(
            f"model.weights: class(es) {', '.join(removed)} of {model.run} are not in dataset.uri; a warm start "
            "keeps every class of the model it starts from: restore their images, or start from other weights"
        )
    state_dict_path = model.metadata["files"]["state_dict"]
    if model.classes == index.classes:
        state = storage.join(model.run, state_dict_path)  # as published: the workers read it themselves
    else:
        state = write_expanded(spec, model, model.read(state_dict_path, endpoint), index.classes)
    print(f"[tlray] warm start from {model.run} ({len(model.classes)} classes, {len(index.classes)} now)")
    return spec.model_copy(update={"model": spec.model.model_copy(update={"weights": state})})


def expand_head(state: dict, arch: str, old: list[str], new: list[str], seed: int) -> dict:
    """`state` with the classifier resized to `new` classes: the rows of classes in `old` copied by name,
    the others freshly initialised (as torchvision initialises a new head, seeded)."""
    from tlray.models.build import build_model
    from tlray.models.layout import head_module

    model = build_model(arch, None, len(old))
    model.load_state_dict(state)
    head = head_module(model, arch)
    name = next(n for n, m in model.named_modules() if m is head)
    torch.manual_seed(seed)
    fresh = torch.nn.Linear(head.in_features, len(new))
    with torch.no_grad():
        for j, cls in enumerate(new):
            if cls in old:
                fresh.weight[j] = head.weight[old.index(cls)]
                fresh.bias[j] = head.bias[old.index(cls)]
    out = dict(state)
    out[f"{name}.weight"], out[f"{name}.bias"] = fresh.weight.detach().clone(), fresh.bias.detach().clone()
    return out


def write_expanded(spec: JobSpec, model: PublishedModel, state_bytes: bytes, classes: list[str]) -> str:
    """Stored beside the job's runs, named by its content's origin, so workers anywhere can read it."""
    state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    expanded = expand_head(state, spec.model.arch, model.classes, classes, spec.train.seed)
    key = hashlib.sha256(f"{model.run}\0{model.manifest['created_at']}\0{classes}".encode()).hexdigest()[:12]
    uri = storage.join(spec.job_uri, "warm-start", f"{model.metadata['run_id']}-{key}.pt")
    buffer = io.BytesIO()
    torch.save(expanded, buffer)
    storage.write_bytes(uri, buffer.getvalue(), spec.dataset.endpoint_url)
    return uri
