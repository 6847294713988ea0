"""`tlray validate SPEC`: every problem of a job spec at once, and the model's blocks with what freezes.

Light on purpose (no torch, no pyarrow): it answers in well under a second, on a laptop or in a pod.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlray import archs  # the block table, not torchvision: validate stays under a second
from tlray.spec import load_spec


def validate(spec_file: str, overrides: Sequence[str] = ()) -> None:
    spec = load_spec(spec_file, overrides)  # 1. parse and validate the whole spec
    model, depth = spec.model, spec.freeze_depth  # 2. what it would train
    blocks = archs.backbone_block_names(model.arch)
    print(f"{spec_file}: valid job spec '{spec.name}'")
    print(f"  model: {model.arch} ({archs.family_of(model.arch)}), weights {model.weights}, mode {model.mode}")
    train = spec.train
    print(f"  frozen blocks: {depth} of {len(blocks)}")
    # train.unfreeze_every: the epoch (1-based) each block that unfreezes first trains in
    unfreezes = {train.freeze_depth_at(depth, e): e + 1 for e in range(train.epochs - 1, 0, -1)}
    for i, block in enumerate(blocks):
        state = "trained" if i >= depth else f"unfreezes at epoch {unfreezes[i]}" if i in unfreezes else "frozen"
        factor = archs.block_lr_factor(model.arch, i, train.layer_lr_decay)
        rate = f", lr x {factor:.3g}" if train.layer_lr_decay != 1 else ""
        print(f"    {i + 1:>3} {block:<24} {state}{rate}")
    if spec.tune:  # what `tlray tune` would run: each choice's number of trials
        counts = {str(choice): spec.trial_choices.count(choice) for choice in spec.trial_choices}
        tries = ", ".join(f"{choice} x{count}" for choice, count in counts.items())
        print(f"  search: {spec.tune.num_samples} trials, freeze_depth {tries}")
    print(f"  workers: {spec.scaling.num_workers} x {'GPU' if spec.scaling.use_gpu else 'CPU'}")
    print(f"  output: {spec.job_uri}/runs/{spec.name}-<hash of spec and data>")
