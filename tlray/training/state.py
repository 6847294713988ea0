"""What a training checkpoint holds (state.pt), typed, and what the loop carries between epochs.

The file stays a plain dict of these keys, in this order: published runs, `tlray publish`, the benchmarks and
older runs read it as one (tlray.io.checkpoints writes and seals it), and a run of a newer tlray resumes from
an older one's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tlray.console import say
from tlray.models.trained import load_model_state, trained_state
from tlray.training.rng import RankStates


@dataclass
class Progress:
    """What the loop carries from one epoch to the next; a checkpoint keeps it beside the weights."""

    start_epoch: int = 0  # 0-based: the first epoch this run of the loop trains
    history: list[dict] = field(default_factory=list)  # every epoch's metrics so far, one entry per epoch
    bad_image_examples: list[str] = field(default_factory=list)  # the first undecodable images (epoch 1's)
    resumes: int = 0  # restarts before this run of the loop: each epoch's metrics say how many came before it
    val_confusion: list[list[int]] | None = None  # the last epoch's validation counts[true][predicted]

    @classmethod
    def after(cls, state: TrainState) -> Progress:
        return cls(state.epoch + 1, state.history, state.bad_image_examples, state.resumes + 1, state.val_confusion)


@dataclass
class TrainState:
    """One epoch's checkpoint: the state dicts of the training objects, and the run's progress up to it."""

    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    epoch: int  # 0-based, the last one trained
    history: list[dict]
    bad_image_examples: list[str]
    resumes: int = 0
    rng: RankStates | None = None  # every rank's random streams (tlray.training.rng); None: saved by no rank
    precision: str | None = None  # train.amp as the workers resolved it on their device (metadata.json says)
    frozen_from: str | None = None  # `model` holds the trained tensors only; the rest are these weights' (identity)
    val_confusion: list[list[int]] | None = None  # this epoch's validation counts[true][predicted]: the run's report

    @classmethod
    def capture(
        cls,
        model,
        optimizer,
        scheduler,
        scaler,
        epoch: int,
        progress: Progress,
        rank_rngs: RankStates,
        precision: str | None = None,
        weights_identity: str | None = None,
    ) -> TrainState:
        """The state after 0-based `epoch` (its metrics already in `progress.history`). With the identity of the
        weights the model started from, the frozen parameters are left out: they are still those weights'."""
        whole = model.state_dict()
        model_state = trained_state(model, whole) if weights_identity else whole
        frozen_from = weights_identity if len(model_state) < len(whole) else None
        return cls(
            model=model_state,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            epoch=epoch,
            history=progress.history,
            bad_image_examples=progress.bad_image_examples,
            resumes=progress.resumes,
            rng=rank_rngs,
            precision=precision,
            frozen_from=frozen_from,
            val_confusion=progress.val_confusion,
        )

    def restore(self, model, optimizer, scheduler, scaler, weights_identity: str | None) -> None:
        """Load into freshly built training objects (the random streams: tlray.training.rng.resume)."""
        load_model_state(model, self.to_checkpoint(), weights_identity)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        scaler.load_state_dict(self.scaler)

    def to_checkpoint(self) -> dict:
        """The dict state.pt holds; a state captured without a precision leaves that key out, as before."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("precision", "frozen_from", "val_confusion"):  # as older checkpoints were
            if saved[key] is None:
                del saved[key]
        return saved

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainState:
        """A state.pt's dict; those of older tlrays have no resumes, random streams or precision."""
        return cls(
            model=saved["model"],
            optimizer=saved["optimizer"],
            scheduler=saved["scheduler"],
            scaler=saved["scaler"],
            epoch=saved["epoch"],
            history=saved["history"],
            bad_image_examples=saved["bad_image_examples"],
            resumes=saved.get("resumes", 0),
            rng=saved.get("rng"),
            precision=saved.get("precision"),
            frozen_from=saved.get("frozen_from"),
            val_confusion=saved.get("val_confusion"),
        )


def say_how_streams_resume(saved: RankStates | None, world_size: int) -> None:
    restored = min(len(saved or ()), world_size)
    if restored < world_size:
        say(
            f"random streams: {restored} of {world_size} rank(s) resume their own; the others start new ones "
            "from train.seed, the epoch and their rank (the checkpoint was saved by a group of "
            f"{len(saved or ())} rank(s))"
        )
