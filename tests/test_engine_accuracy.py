"""`prism-trt accuracy --engines DIR`: the MNIST test set through the engines a build wrote, each
chain in process and over a real two-process GLOO group, scored against the local engines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "prism_trt.cli"]
LIMIT = 96


@pytest.fixture(scope="module")
def mnist_engines(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine-accuracy") / "engines"
    result = subprocess.run([*CLI, "build", "--checkpoint", str(mnist_dir / "vit_mnist.pt"), "--ranks", "2", "--cr",
                             "5", "--max-batch", "16", "--threads", "1", "--out", str(out), "-q"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def scores(*argv: str) -> list[dict]:
    result = subprocess.run([*CLI, "accuracy", *argv, "--limit", str(LIMIT), "--json"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_chain_scored_in_process_and_over_a_gloo_group(mnist_engines, mnist_dir):
    rows = {(row["chain"], row["execution"]): row for row in scores("--engines", str(mnist_engines), "--data",
                                                                     str(mnist_dir), "--batch-size", "16")}
    assert set(rows) == {("local", "in-process"), ("voltage", "in-process"), ("prism-cr5", "in-process"),
                         ("voltage", "gloo"), ("prism-cr5", "gloo")}
    local = rows["local", "in-process"]
    assert local["agreement_with_local"] == 1 and local["versus_local"]["max_abs_error"] == 0
    assert local["accuracy"] > 0.9  # the checkpoint's 97 % on its first images
    voltage = rows["voltage", "in-process"]  # CR 1 computes the unpartitioned model
    assert voltage["versus_local"]["passed"] and voltage["correct"] == local["correct"]
    prism = rows["prism-cr5", "in-process"]
    assert not prism["versus_local"]["passed"] and prism["agreement_with_local"] < 1  # L=5 loses information
    for chain in ("voltage", "prism-cr5"):  # the group changes where a chain runs, not what it computes
        distributed, in_process = rows[chain, "gloo"], rows[chain, "in-process"]
        assert distributed["versus_in_process"]["passed"] and distributed["ranks"] == 2
        assert distributed["correct"] == in_process["correct"]


def test_the_engines_score_what_the_torch_simulation_of_their_plan_scores(mnist_engines, mnist_dir):
    engine = {row["chain"]: row for row in scores("--engines", str(mnist_engines), "--data", str(mnist_dir),
                                                  "--no-distributed")}
    assert {row["execution"] for row in engine.values()} == {"in-process"}
    simulated = scores("--checkpoint", str(mnist_dir / "vit_mnist.pt"), "--data", str(mnist_dir), "--ranks", "2",
                       "--segments", "5")[0]
    assert abs(engine["prism-cr5"]["correct"] - simulated["correct"]) <= 1, (engine["prism-cr5"], simulated)


def test_plan_options_do_not_apply_to_engines(mnist_engines):
    result = subprocess.run([*CLI, "accuracy", "--engines", str(mnist_engines), "--cr", "9.9"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "do not apply" in result.stderr, result.stderr
