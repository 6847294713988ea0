"""Sealed checkpoints: a resume takes the newest complete one, local or in S3, and never a partial upload."""

from __future__ import annotations

import torch

from tlray.io import checkpoints, storage


def write_epochs(folder, epochs: int) -> list[dict]:
    states = []
    for epoch in range(epochs):
        state = {"epoch": epoch, "weights": torch.full((64,), float(epoch)), "history": list(range(epoch + 1))}
        target = folder / checkpoints.folder_name(epoch)
        target.mkdir(parents=True)
        checkpoints.write(state, target)
        states.append(state)
    return states


def test_the_newest_sealed_checkpoint_is_found(tmp_path):
    write_epochs(tmp_path / "train", 3)
    (tmp_path / "train" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own files are ignored
    found = checkpoints.newest_complete(str(tmp_path / "train"), None)
    assert found.folder == str(tmp_path / "train" / "epoch_0003")
    assert found.state["epoch"] == 2 and torch.equal(found.state["weights"], torch.full((64,), 2.0))
    assert found.skipped == ()


def test_partial_uploads_are_skipped_for_the_newest_complete_one(tmp_path):
    folder = tmp_path / "train"
    write_epochs(folder, 4)
    state_file = folder / "epoch_0004" / checkpoints.STATE_FILE
    whole = state_file.read_bytes()
    state_file.write_bytes(whole[: len(whole) // 2])  # cut off part-way, its seal already there
    (folder / "epoch_0003" / checkpoints.SEAL_FILE).unlink()  # cut off before the seal
    corrupt = bytearray((folder / "epoch_0002" / checkpoints.STATE_FILE).read_bytes())
    corrupt[-20] ^= 0xFF  # every byte there, one of them wrong
    (folder / "epoch_0002" / checkpoints.STATE_FILE).write_bytes(bytes(corrupt))

    found = checkpoints.newest_complete(str(folder), None)
    assert found.state["epoch"] == 0 and found.folder.endswith("epoch_0001")
    assert found.skipped == (
        f"epoch_0004 (state.pt has {len(whole) // 2} of {len(whole)} bytes)",
        "epoch_0003 (no seal: its upload did not finish)",
        "epoch_0002 (state.pt does not match its SHA-256)",
    )


def test_no_complete_checkpoint_is_none(tmp_path):
    assert checkpoints.newest_complete(str(tmp_path / "nothing-yet"), None) is None
    (tmp_path / "train" / "epoch_0001").mkdir(parents=True)
    (tmp_path / "train" / "epoch_0001" / checkpoints.STATE_FILE).write_bytes(b"partial")
    assert checkpoints.newest_complete(str(tmp_path / "train"), None) is None


def test_in_s3_a_partial_newest_checkpoint_is_skipped(tmp_path, s3_env, s3_bucket):
    local = tmp_path / "train"
    states = write_epochs(local, 2)
    uri = f"s3://{s3_bucket}/runs/r/train"
    storage.upload_dir(local, uri, s3_env)
    whole = (local / "epoch_0002" / checkpoints.STATE_FILE).read_bytes()
    storage.write_bytes(f"{uri}/epoch_0002/{checkpoints.STATE_FILE}", whole[:100], s3_env)

    found = checkpoints.newest_complete(uri, s3_env)
    assert found.folder == f"{uri}/epoch_0001"
    assert found.state["history"] == states[0]["history"]
    assert found.skipped == (f"epoch_0002 (state.pt has 100 of {len(whole)} bytes)",)
