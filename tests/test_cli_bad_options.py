"""Numeric and device options are checked where they are parsed, on every rank, before anything
runs: non-finite floats anywhere, non-positive entries of comma lists, a batch past the engines'
max batch, a device that does not exist here, a file that is no checkpoint. Each is an `Error:`
line with exit 1 or 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import build_engines, random_model, small_spec

from prism_trt.cli import main
from prism_trt.cli.common import NumberList


def float_options() -> list[tuple[list[str], str, int]]:
    """(command path, option, values it takes) of every float option of every command."""
    found = []

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                walk(sub, [*path, name])
            return
        for param in command.params:
            kinds = param.type.types if isinstance(param.type, click.Tuple) else [param.type]
            if any(isinstance(kind, click.types.FloatParamType) or isinstance(kind, NumberList) and kind.kind is float
                   for kind in kinds):
                found.append((path, param.opts[0], len(kinds)))

    walk(main, [])
    return found


FLOAT_OPTIONS = float_options()


def invoke(*argv: str):
    return CliRunner().invoke(main, list(argv), catch_exceptions=False)


def test_the_cli_has_float_options_to_check():
    assert len(FLOAT_OPTIONS) >= 20  # the walk found them; a broken walk would check nothing


@pytest.mark.parametrize("path, option, arity", FLOAT_OPTIONS, ids=[f"{' '.join(p)} {o}" for p, o, _ in FLOAT_OPTIONS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_refuses_non_finite_values(path, option, arity, value):
    result = invoke(*path, option, *([value] * arity))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and "finite" in result.output


@pytest.mark.parametrize("value", ["-5", "0", "nan"])
def test_select_refuses_a_bandwidth_that_is_no_link_rate(tmp_path, value):
    (tmp_path / "perf.json").write_text("{}")
    result = invoke("select", "--map", str(tmp_path / "perf.json"), "--batch", "1", "--bandwidth", value)
    assert result.exit_code == 2 and "Invalid value for '--bandwidth'" in result.output, result.output


@pytest.mark.parametrize("option, value", [("--batch", "0,-1"), ("--batch", "4,0"), ("--cr", "nan"),
                                           ("--cr", "-2"), ("--bandwidth", "0,100"), ("--bandwidth", "inf")])
def test_profile_refuses_non_positive_list_entries(tmp_path, option, value):
    result = invoke("profile", "--engines", str(tmp_path), "--out", str(tmp_path / "map.json"), option, value)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and "positive" in result.output


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "tpu", "cpu:1"])
def test_serve_and_run_refuse_a_device_that_is_no_device(tmp_path, device):
    for command in ("serve", "run"):
        result = invoke(command, "--engines", str(tmp_path), "--device", device)
        assert result.exit_code == 2 and "Invalid value for '--device'" in result.output, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_serve_refuses_cuda_without_cuda(tmp_path):
    result = invoke("serve", "--engines", str(tmp_path), "--device", "cuda:0")
    assert result.exit_code == 2, result.output
    assert "cuda:0" in result.output and "no CUDA device" in result.output and "cpu" in result.output


def test_cpu_is_still_a_device(tmp_path):
    result = invoke("run", "--engines", str(tmp_path / "missing"), "--device", "cpu")
    assert "'--device'" not in result.output


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("max-batch-8")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 1, max_batch=8, source={"timm": "test"})
    return out


@pytest.mark.parametrize("batch", [9, 100_000])
def test_run_refuses_a_batch_past_the_engines_max_batch(small_build, batch):
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(small_build), "--mode",
                             "local", "--batch", str(batch), "--repeat", "1", "--warmup", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode in (1, 2), result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Error:" in result.stderr
    assert f"--batch {batch}" in result.stderr and "max batch 8" in result.stderr


@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"", b"\x80\x02}q\x00.", b"PK\x03\x04junk"],
                         ids=["passwd", "empty", "pickled_empty_dict", "zip_header_only"])
def test_build_refuses_a_file_that_is_no_checkpoint(tmp_path, content):
    path = tmp_path / "not-a-checkpoint.pt"
    path.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "build", "--checkpoint", str(path), "--ranks", "1",
                             "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Error:" in result.stderr and str(path) in result.stderr
