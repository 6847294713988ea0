"""Gradual unfreezing with layer decay through Ray Train on 2 CPU workers: every rank rewraps the grown trained part
in DistributedDataParallel as each block unfreezes, and each epoch's metrics say what trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tlray.artifacts.export import run_uri
from tlray.cli import main
from tlray.data.index import build_index
from tlray.models import build
from tlray.spec import load_spec

from conftest import spec_dict, write_image_folder, write_spec

pytestmark = pytest.mark.slow


def test_two_workers_unfreeze_from_the_head_one_block_an_epoch(tmp_path):
    data = write_image_folder(tmp_path / "images", classes=3, per_class=12)
    torch.manual_seed(0)
    start = build.build_model("resnet18", None, 1000)
    torch.save(start.state_dict(), tmp_path / "weights.pt")
    model = {"arch": "resnet18", "weights": str(tmp_path / "weights.pt"), "mode": "partial", "freeze_depth": "all"}
    train = {"epochs": 3, "batch_size": 4, "unfreeze_every": 1, "unfreeze_to": 3, "layer_lr_decay": 0.5}
    spec = spec_dict(
        str(data), str(tmp_path / "out"), model=model, train=train, scaling={"num_workers": 2, "cpus_per_worker": 0.5}
    )
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    assert main(["train", str(spec_path)]) == 0

    loaded = load_spec(spec_path)
    run = Path(run_uri(loaded, build_index(loaded.dataset), "train"))
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["freeze_depth"] for h in history] == [5, 4, 3]  # all, then layer4, then layer3 train too
    layer4, layer3 = (sum(p.numel() for p in block.parameters()) for block in (start.layer4, start.layer3))
    fc = 512 * 3 + 3  # the new head
    assert [h["trainable_parameters"] for h in history] == [fc, fc + layer4, fc + layer4 + layer3]
    # the published weights: layer3 moved (it trained in epoch 3), layer2 never did
    state = torch.load(run / "model" / "state_dict.pt", map_location="cpu", weights_only=True)
    assert not torch.equal(state["layer3.0.conv1.weight"], start.layer3[0].conv1.weight)
    assert torch.equal(state["layer2.0.conv1.weight"], start.layer2[0].conv1.weight)
