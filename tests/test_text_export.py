"""Text models (BERT, GPT-2) through `prism-trt build`: stages, manifest, and the engines' maths.

Engines are built once per family by the CLI (conftest's ``text_engines``: N = 16, P = 2, local,
voltage and prism CR 2) and compared with the torch reference: the unpartitioned model for the
local chain, :func:`simulate_text` for the distributed ones, on right-padded batches."""

import json

import pytest
from click.testing import CliRunner
from conftest import ONE_THREAD, TEXT_SEQ_LEN, assert_close, small_spec, text_request

from prism_trt.cli import main
from prism_trt.core import make_segment_plan, voltage_plan
from prism_trt.core.text_rank import simulate_text, text_partition
from prism_trt.engines import ChainKey
from prism_trt.engines.manifest import Manifest, ManifestError, ModelRecord
from prism_trt.engines.stage_spec import ATTENTION_MASK, INPUT_IDS, MEANS, REMOTE_MEANS
from prism_trt.model import weights_hash
from prism_trt.runtime import load_chain, run_chains_in_process
from prism_trt.runtime.request import InferenceRequest

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")
pytestmark = pytest.mark.timeout(300)
FAMILIES = ["gpt2", "bert-base-uncased"]


def chains(directory, mode: str, cr: float | None = None):
    ranks = [0] if mode == "local" else [0, 1]
    return [load_chain(directory / f"rank{r}", mode, cr, options=ONE_THREAD).__enter__() for r in ranks]


def reference(model, mode: str, segments: int | None, ids, mask):
    if mode == "local":
        return model(ids, mask)
    partition = text_partition(model.spec, TEXT_SEQ_LEN, 2)
    plan = voltage_plan(partition) if mode == "voltage" else make_segment_plan(partition, segments=segments)
    return simulate_text(model, plan, ids, mask)


@pytest.mark.parametrize("name", FAMILIES)
def test_manifest_records_the_text_model(text_engines, name):
    directory, model = text_engines(name)
    first, second = (Manifest.load(directory / f"rank{r}") for r in range(2))
    assert first.model.kind == "text" and first.num_tokens == TEXT_SEQ_LEN
    assert first.model.weights_sha256 == weights_hash(model) and first.spec == model.spec
    assert first.keys() == [ChainKey.local(), ChainKey.voltage(), ChainKey.prism(4, TEXT_SEQ_LEN, 2)]
    assert first.key_for("prism", 2.0) == ChainKey.prism(4, TEXT_SEQ_LEN, 2)
    prism0, prism1 = (m.config(ChainKey.prism(4, TEXT_SEQ_LEN, 2)) for m in (first, second))
    embed = prism0.stage("embed").spec
    assert [(t.name, t.dtype) for t in embed.inputs] == [(INPUT_IDS, "int64"), (ATTENTION_MASK, "int64")]
    inputs = {r: [t.name for t in c.stage("block_00").spec.inputs] for r, c in enumerate((prism0, prism1))}
    outputs = {r: [t.name for t in c.stage("embed").spec.outputs] for r, c in enumerate((prism0, prism1))}
    head = prism0.stage("head").spec
    if model.spec.causal:  # rank 0 reads nobody's means, rank 1 sends none (nobody after it reads them)
        assert REMOTE_MEANS not in inputs[0] and REMOTE_MEANS in inputs[1]
        assert MEANS in outputs[0] and MEANS not in outputs[1]
        assert head.inputs[0].shape[1] == TEXT_SEQ_LEN and head.outputs[0].shape[1:] == (TEXT_SEQ_LEN, 97)
    else:
        assert REMOTE_MEANS in inputs[0] and REMOTE_MEANS in inputs[1] and MEANS in outputs[1]
        assert head.inputs[0].shape[1] == prism0.plan.partition.sizes[0]
        assert head.outputs[0].shape[1:] == (model.spec.num_classes,)
    assert all(ATTENTION_MASK in names for names in inputs.values())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", ["local", "voltage", "prism"])
def test_engines_equal_the_reference(text_engines, name, mode):
    """Padded batches (lengths 16, 11, 5): the engines compute what the torch reference does."""
    directory, model = text_engines(name)
    ids, mask = text_request()
    ranks = chains(directory, mode, 2.0 if mode == "prism" else None)
    request = InferenceRequest.of(ranks[0].manifest.model, {INPUT_IDS: ids, ATTENTION_MASK: mask})
    got = run_chains_in_process(ranks, request)
    segments = ranks[0].config.plan.segments
    assert_close(got, reference(model, mode, segments, ids, mask), name=f"{name} {mode}")
    if mode == "local":  # and the monolithic model, the P = 1 comparison
        with load_chain(directory / "rank0", "local", options=ONE_THREAD, use_monolithic=True) as whole:
            assert_close(whole.monolithic(request), got, name="monolithic")


def test_vit_manifests_keep_their_layout():
    """A ViT record writes exactly the fields it always did (so existing digests still match)."""
    record = ModelRecord({"timm": "tiny"}, small_spec(), "0" * 64)
    assert sorted(record.to_dict()) == ["source", "spec", "weights_sha256"]
    assert record.num_tokens == small_spec().num_tokens and not record.causal


def test_edited_sequence_length_is_refused(text_engines, tmp_path):
    directory, _ = text_engines("gpt2")
    path = directory / "rank1" / "manifest.json"
    data = json.loads(path.read_text())
    data["model"]["sequence_length"] = 8
    copy = tmp_path / "rank1"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(data))
    # its chains' partitions no longer sum to N: refused on reading, before the digest is compared
    with pytest.raises(ManifestError, match="not a plan of 8 tokens .*; rebuild the engines"):
        Manifest.load(copy, verify=True)


@pytest.mark.parametrize("args, message", [
    (["--model", "vit_tiny_patch16_224", "--layers", "2"], "apply to text models only"),
    (["--model", "gpt2", "--layers", "1", "--hidden-size", "8", "--heads", "2", "--vocab-size", "11",
      "--seq-len", "5000"], "exceeds gpt2's 1024 positions"),
])
def test_build_refuses_bad_text_options(tmp_path, args, message):
    result = CliRunner().invoke(main, ["build", *args, "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2 and message in result.output, result.output
