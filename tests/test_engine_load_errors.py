"""An engine file that onnxruntime cannot parse, even one whose digests were recomputed so that the
manifest check passes, is an EngineLoadError naming the file, not onnxruntime's traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import build_engines, random_model, small_spec

from prism_trt.engines import Manifest
from prism_trt.engines.base import EngineLoadError
from prism_trt.engines.json_record import sha256_file, sha256_json
from prism_trt.engines.manifest import DIGEST_FIELD
from prism_trt.runtime import load_chain
from prism_trt.runtime.chain import run_chains_in_process
from prism_trt.runtime.request import InferenceRequest


@pytest.fixture(scope="module")
def corrupt_build(tmp_path_factory):
    """A one-rank build whose local chain's first engine and monolithic engine (what local mode
    runs) are garbage, with every digest recomputed."""
    out = tmp_path_factory.mktemp("corrupt-engine")
    build_engines(random_model(small_spec(img=32, depth=2)), out, 1, max_batch=8, source={"timm": "test"})
    rank_dir = out / "rank0"
    manifest = Manifest.read(rank_dir)
    engine = rank_dir / manifest.config(manifest.key_for("local", None)).stages[0].engine
    monolithic = rank_dir / manifest.monolithic.engine
    path = rank_dir / "manifest.json"
    data = json.loads(path.read_text())
    for corrupt in (engine, monolithic):
        corrupt.write_bytes(b"\x08\x07garbage, not a protobuf" * 50)
        data["files"][str(corrupt.relative_to(rank_dir))] = sha256_file(corrupt)
    data.pop(DIGEST_FIELD)
    data[DIGEST_FIELD] = sha256_json(data)
    path.write_text(json.dumps(data))
    Manifest.load(rank_dir)  # the digests agree: only onnxruntime can tell
    return out, engine, monolithic


def test_a_corrupt_engine_is_an_engine_load_error_naming_the_file(corrupt_build):
    out, engine, _ = corrupt_build
    with pytest.raises(EngineLoadError, match=rf"{engine}.*rebuild"):
        with load_chain(out / "rank0", "local") as chain:
            run_chains_in_process([chain], InferenceRequest.of(chain.manifest.model, torch.zeros(1, 3, 32, 32)))


def test_run_with_a_corrupt_engine_says_error_not_traceback(corrupt_build):
    out, _, engine = corrupt_build  # local mode runs the monolithic engine
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(out), "--mode", "local",
                             "--batch", "1", "--repeat", "1", "--warmup", "0"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Error:" in result.stderr and engine.name in result.stderr
