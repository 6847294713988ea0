"""The command table: every command's flow exists, and takes exactly the arguments its parser gives it
(main passes them by keyword), so a renamed option or parameter fails here, not in a user's run."""

from __future__ import annotations

import importlib
import inspect

import pytest

from tlray import cli

# the fewest arguments each command accepts
SMALLEST = {
    "validate": ["validate", "job.yaml"],
    "train": ["train", "job.yaml"],
    "demo": ["demo"],
    "tune": ["tune", "job.yaml"],
    "evaluate": ["evaluate", "run", "images"],
    "predict": ["predict", "run", "images", "--out", "p.csv"],
    "render": ["render", "job.yaml", "--image", "t:1"],
    "launch": ["launch", "template"],
    "report": ["report", "run"],
    "reference": ["reference"],
}


def test_every_command_is_in_the_table_once():
    assert list(SMALLEST) == list(cli.COMMANDS)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_runs_a_flow_named_like_it_that_takes_its_arguments(name):
    options = vars(cli.build_parser().parse_args(SMALLEST[name]))
    assert (options.pop("command"), options.pop("verbose")) == (name, False)
    flow = getattr(importlib.import_module(cli.COMMANDS[name].flow), name)
    assert set(options) <= set(inspect.signature(flow).parameters), name  # every argument has its parameter
    inspect.signature(flow).bind(**options)  # and every parameter without a default its argument
