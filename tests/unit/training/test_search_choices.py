"""Which trials a search runs: `tune.num_samples` of them, the `tune.freeze_depth` choices taking turns.

Tune's own variant generator expands the search space here, as the search's Tuner does, without a cluster."""

from __future__ import annotations

from collections import Counter

import pytest
from ray.tune.experiment import Experiment
from ray.tune.search.basic_variant import BasicVariantGenerator

from tlray.spec import JobSpec
from tlray.training.search import search_space, trial_count

from conftest import spec_dict

CHOICES = ["random", 0, 2, 4, "all"]


def search(tmp_path, num_samples: int, choices: list | None = CHOICES) -> JobSpec:
    model = {"arch": "resnet18", "weights": "DEFAULT", "mode": "partial", "freeze_depth": 2}
    tune = {"num_samples": num_samples, "lr": {"min": 1e-4, "max": 1e-2}}
    if choices is not None:
        tune["freeze_depth"] = choices
    return JobSpec.model_validate(spec_dict(str(tmp_path), str(tmp_path / "out"), model=model, tune=tune))


def tune_trials(spec: JobSpec) -> list[dict]:
    """The configs Tune creates from the search space, in order: what the search's BasicVariantGenerator yields."""
    generator = BasicVariantGenerator(random_state=spec.train.seed)
    generator.add_configurations([Experiment("search", lambda config: None, config=search_space(spec), num_samples=1)])
    configs = []
    while (trial := generator.next_trial()) is not None:
        configs.append(trial.config)
    return configs


def test_as_many_samples_as_choices_try_each_choice_once(tmp_path):
    spec = search(tmp_path, num_samples=5)
    assert spec.trial_choices == CHOICES
    configs = tune_trials(spec)
    assert [c["freeze_depth"] for c in configs] == CHOICES
    assert trial_count(spec) == len(configs) == 5


def test_more_samples_than_choices_give_the_first_choices_a_second_trial(tmp_path):
    spec = search(tmp_path, num_samples=7)
    configs = tune_trials(spec)
    assert [c["freeze_depth"] for c in configs] == ["random", 0, 2, 4, "all", "random", 0]
    assert Counter(str(c["freeze_depth"]) for c in configs) == {"random": 2, "0": 2, "2": 1, "4": 1, "all": 1}
    assert trial_count(spec) == 7


def test_every_trial_samples_its_own_lr_the_same_for_the_same_spec(tmp_path):
    configs = tune_trials(search(tmp_path, num_samples=7))
    lrs = [c["lr"] for c in configs]
    assert len(set(lrs)) == 7 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    random_trials = [c["lr"] for c in configs if c["freeze_depth"] == "random"]
    assert random_trials[0] != random_trials[1]  # a repeated choice is another point, not a copy
    assert [c["lr"] for c in tune_trials(search(tmp_path, num_samples=7))] == pytest.approx(lrs)


def test_without_choices_every_trial_trains_at_model_freeze_depth(tmp_path):
    configs = tune_trials(search(tmp_path, num_samples=3, choices=None))
    assert [c["freeze_depth"] for c in configs] == [2, 2, 2]
