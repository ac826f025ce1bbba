"""Engine directories are verified on load: every corruption gets an error naming file and reason."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import build_engines, random_model, small_spec

from prism_trt.core import PlanError
from prism_trt.engines import ChainKey, Manifest, ManifestError
from prism_trt.engines.manifest import SCHEMA_VERSION
from prism_trt.runtime import load_chain


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = random_model(small_spec(img=32, depth=2))
    out = tmp_path_factory.mktemp("engines")
    build_engines(model, out, 2, [3.0], source={"timm": "test"})
    return out


@pytest.fixture
def rank_dir(built, tmp_path):
    copy = tmp_path / "rank1"
    shutil.copytree(built / "rank1", copy)
    return copy


def _edit_manifest(rank_dir, change):
    path = rank_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_intact_directory_loads(rank_dir):
    manifest = Manifest.load(rank_dir, backend="onnxruntime", device="cpu")
    assert manifest.rank == 1 and len(manifest.files) > 0
    # the typed record writes back exactly the file the build wrote
    assert json.loads(json.dumps(manifest.to_dict())) == json.loads((rank_dir / "manifest.json").read_text())
    assert [c.key for c in manifest.configs] == [ChainKey.voltage(), ChainKey.prism(3, 17, 2)]
    assert manifest.key_for("prism", 3.0) == ChainKey.prism(3, 17, 2)


def test_missing_file(rank_dir):
    victim = rank_dir / "voltage" / "block_01.ort.onnx"
    victim.unlink()
    with pytest.raises(ManifestError, match=r"block_01\.ort\.onnx: missing"):
        Manifest.load(rank_dir)


def test_hash_mismatch(rank_dir):
    victim = rank_dir / "prism-cr3" / "embed.onnx"
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match=r"embed\.onnx: SHA-256 mismatch"):
        Manifest.load(rank_dir)


def test_edited_fields_are_noticed(rank_dir):
    """The manifest protects its own fields: a max batch raised by hand would be served unverified."""
    _edit_manifest(rank_dir, lambda m: m["build_options"].update(max_batch=64))
    assert Manifest.read(rank_dir).build_options.max_batch == 64  # still a well-formed manifest ...
    with pytest.raises(ManifestError, match=r"manifest\.json: its fields changed after the build"):
        Manifest.load(rank_dir)  # ... that is not the one the build wrote
    with pytest.raises(ManifestError, match="its fields changed after the build"):
        load_chain(rank_dir, "voltage")


def test_other_schema_version(rank_dir):
    _edit_manifest(rank_dir, lambda m: m.update(schema_version=99))
    with pytest.raises(ManifestError,
                       match=rf"manifest\.json: schema version 99, this prism-trt reads version {SCHEMA_VERSION}"):
        Manifest.load(rank_dir)


def test_engines_of_an_older_schema_ask_for_a_rebuild(rank_dir):
    _edit_manifest(rank_dir, lambda m: m.update(schema_version=SCHEMA_VERSION - 1))
    with pytest.raises(ManifestError, match=rf"schema version {SCHEMA_VERSION - 1}, built by an older prism-trt .*"
                                            r"rebuild them with `prism-trt build`"):
        load_chain(rank_dir, "voltage")


def test_other_backend(rank_dir):
    _edit_manifest(rank_dir, lambda m: m["backend"].update(name="tensorrt"))
    with pytest.raises(ManifestError, match="built for backend 'tensorrt', not 'onnxruntime'"):
        Manifest.load(rank_dir, backend="onnxruntime")


def test_other_device(rank_dir):
    _edit_manifest(rank_dir, lambda m: m["backend"].update(device="cuda:NVIDIA Orin"))
    with pytest.raises(ManifestError, match="built for device 'cuda:NVIDIA Orin', this device is 'cpu'"):
        load_chain(rank_dir, "voltage")


def test_not_an_engine_directory(tmp_path):
    with pytest.raises(ManifestError, match="not an engine directory"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_missing_mode(rank_dir):
    with pytest.raises(ManifestError, match=r"no local engines in this directory \(built: voltage, prism-cr3\)"):
        load_chain(rank_dir, "local")
    with pytest.raises(ManifestError, match=r"no prism-cr4\.5 engines in this directory \(built: voltage, prism-cr3\)"):
        load_chain(rank_dir, "prism", 4.5)
    with pytest.raises(PlanError, match=r"CR must be between 1 \(no compression\) and ceil\(N/P\) = 9"):
        load_chain(rank_dir, "prism", 9.9)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["configs"][1]["stages"][0].update(engine="../../../../x.ort.onnx"),
     r"configs\[1\]\.stages\[0\]\.engine: '\.\./\.\./\.\./\.\./x\.ort\.onnx' must be a path inside"),
    (lambda m: m["configs"][0]["stages"][1].update(onnx="/etc/passwd"), r"stages\[1\]\.onnx: '/etc/passwd' must be"),
    (lambda m: m["files"].update({"../escape.onnx": "0" * 64}), r"'\.\./escape\.onnx' must be a path inside"),
    (lambda m: m["files"].update({"x.onnx": 5}), r"files\.x\.onnx: expected a SHA-256 hex string"),
    (lambda m: m["configs"][1].update(segment_sizes=[1, 2]),
     r"segment_sizes\[0\]: expected a JSON list|sizes: expected"),
    (lambda m: m["configs"][1].update(counts=["a", 2]), r"configs\[1\]\.counts: expected integers >= 1"),
    (lambda m: m["configs"][1].update(partition=[True, 16]), r"configs\[1\]\.partition: expected integers >= 1"),
    (lambda m: m["configs"][1].update(cr=10**400), r"configs\[1\]\.cr: must be a finite number"),
    (lambda m: m["configs"][1]["stages"][0].update(verification={"foo": 1}),
     r"stages\[0\]\.verification: required field 'engine' is missing"),
    (lambda m: m.pop("world_size"), r"required field 'world_size' is missing"),
    (lambda m: m.update(rank=5), r"rank: 5 is not a rank of a 2-rank build"),
    (lambda m: m["configs"][1].update(segments="many"), r"configs\[1\]\.segments: expected int"),
    (lambda m: m["configs"][1].update(mode="turbo"), r"configs\[1\]\.mode: expected local, voltage or prism"),
    (lambda m: m["build_options"].update(max_batch=0), r"build_options: batch profile must satisfy"),
    (lambda m: m["model"]["spec"].pop("depth"), r"model\.spec: not a model description"),
])
def test_malformed_manifest_is_refused_before_anything_loads(rank_dir, change, message):
    _edit_manifest(rank_dir, change)
    with pytest.raises(ManifestError, match=message):
        Manifest.read(rank_dir)


def test_inspect_refuses_a_stage_outside_the_directory(rank_dir):
    _edit_manifest(rank_dir, lambda m: m["configs"][1]["stages"][0].update(engine="../../../../x.ort.onnx"))
    shown = subprocess.run([sys.executable, "-m", "prism_trt.cli", "inspect", str(rank_dir)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 1 and "must be a path inside the engine directory" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_build_and_inspect_cli(mnist_dir, tmp_path):
    out = tmp_path / "engines"
    cli = [sys.executable, "-m", "prism_trt.cli"]
    result = subprocess.run(cli + ["build", "--checkpoint", str(mnist_dir / "vit_mnist.pt"), "--ranks", "2",
                                   "--segments", "5", "--exporter", "torchscript", "--out", str(out), "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "prism-cr5" in result.stdout and "rank1" in result.stdout
    shown = subprocess.run(cli + ["inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "SHA-256 verified" in shown.stdout
    (out / "rank1" / "voltage" / "head.onnx").write_text("x") if (out / "rank1" / "voltage" / "head.onnx").exists() \
        else (out / "rank1" / "voltage" / "block_02.onnx").write_text("x")
    broken = subprocess.run(cli + ["inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0 and "SHA-256 mismatch" in broken.stderr and "Traceback" not in broken.stderr


def test_build_cli_bad_backend_names_the_fix(tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    result = subprocess.run([sys.executable, "-m", "prism_trt.cli", "build", "--model", "vit_tiny_patch16_224",
                             "--backend", "tensorrt", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and ".[trt]" in result.stderr and "Traceback" not in result.stderr
