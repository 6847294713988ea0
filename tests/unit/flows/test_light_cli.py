"""The commands that run in small pods or on a laptop load no ML stack: neither torch, torchvision, ray
nor pyarrow. `tlray launch` runs in a 0.5 GiB pod; `tlray validate` should answer in well under a second."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tlray import archs

from conftest import ROOT

HEAVY = ("torch", "torchvision", "ray", "pyarrow")
PETS, DIGITS = str(ROOT / "jobs" / "pets-s3.yaml"), str(ROOT / "jobs" / "digits.yaml")

# Runs one command in a fresh interpreter, then reports which heavy modules it loaded, its peak RSS and
# the CPU time of the whole process (not wall time, which other work on a busy CI machine stretches).
PROBE = """
import json, resource, sys
from tlray.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:  # --help
    code = exc.code
usage = resource.getrusage(resource.RUSAGE_SELF)
seconds = usage.ru_utime + usage.ru_stime
heavy = sorted(m for m in {heavy} if m in sys.modules)
# VmHWM, not ru_maxrss: ru_maxrss carries over the forking parent's peak (a pytest process with torch loaded)
peak_mb = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024
print("PROBE " + json.dumps({{"code": code, "heavy": heavy, "seconds": seconds, "peak_mb": peak_mb}}), file=sys.stderr)
"""


def probe(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(argv)], capture_output=True, text=True, timeout=120
    )
    line = [entry for entry in done.stderr.splitlines() if entry.startswith("PROBE ")]
    assert line, done.stderr
    return json.loads(line[-1].removeprefix("PROBE "))


@pytest.mark.parametrize(
    "argv, code",
    [
        (("validate", DIGITS), 0),
        (("validate", PETS), 0),
        (("render", PETS, "--image", "t:1"), 0),
        (("render", PETS, "--image", "t:1", "--kind", "cronjob"), 0),
        (("render", PETS, "--image", "t:1", "--kind", "raycronjob"), 0),
        (("render", PETS, "--image", "t:1", "--kind", "raycluster"), 0),
        (("launch", "pets-template", "--namespace", "ml", "--api-server", "http://127.0.0.1:9"), 2),  # refused
        (("reference",), 0),
        (("--help",), 0),
    ],
    ids=lambda value: " ".join(a for a in value if not a.startswith("/"))[:40] if isinstance(value, tuple) else "",
)
def test_light_commands_import_no_ml_stack(argv, code):
    result = probe(*argv)
    assert result["heavy"] == [], result
    assert result["code"] == code, result


def test_validate_is_fast_and_small():
    result = probe("validate", DIGITS)
    assert result["code"] == 0
    assert result["peak_mb"] < 150, result  # measured: about 35 MB (torch alone is over 1 GB)
    assert result["seconds"] < 1.0, result  # measured: about 0.2 s of CPU (torch's import alone takes seconds)


def test_arch_table_matches_torchvision():
    """tlray.archs is written down to keep torch out of the light commands; this keeps it true."""
    import torchvision

    from tlray.models import layout

    assert list(archs.SUPPORTED_FAMILIES) == ["resnet", "efficientnet", "mobilenet", "convnext", "regnet", "vit"]
    for arch, entry in archs.ARCHS.items():
        # the block map, read off the model torchvision builds (on the meta device: no memory, no weights)
        assert archs.backbone_block_names(arch) == layout.backbone_block_names(arch), arch
        enum = torchvision.models.get_model_weights(arch)
        assert entry.weights_enum == enum.__name__, arch
        assert set(archs.weights_names(arch)) == set(enum.__members__), arch


def test_weights_names_resolve_like_torchvision():
    from tlray.models import build

    for name in ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V1", "IMAGENET1K_V9", "ckpt.pt"):
        member = build.torchvision_weights("resnet50", name)
        assert archs.torchvision_weights_name("resnet50", name) == (member and name.rsplit(".", 1)[-1]), name


def test_validate_prints_the_runs_folder_that_publish_uses(tmp_path, capsys):
    from tlray.artifacts.export import runs_uri
    from tlray.cli import main
    from tlray.spec import load_spec

    for output, expected in (
        ("outputs", f"{Path('outputs').resolve()}/digits/runs"),
        ("s3://bucket/runs/", "s3://bucket/runs/digits/runs"),
        (str(tmp_path), f"{tmp_path}/digits/runs"),
    ):
        assert runs_uri(load_spec(DIGITS, [f"output.uri={output}"])) == expected, output
    assert main(["validate", DIGITS]) == 0
    assert f"output: {runs_uri(load_spec(DIGITS))}/digits-<hash" in capsys.readouterr().out
