"""The bundled trained tiny GPT-2 (gpt2-pydoc): its checkpoint, its held-out windows, next-token
accuracy / agreement of Prism plans, and calibration feeding the selector's agreement floor."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from prism_trt.cli import main
from prism_trt.core import make_segment_plan, text_partition, voltage_plan
from prism_trt.core.precision import Tolerance
from prism_trt.data.text_corpus import HELDOUT_FILE, IGNORE, TINY_GPT2_DIR, TextWindows, read_corpus, read_meta
from prism_trt.engines import AccuracyEntry, ChainKey, PerfMap, PerfPoint
from prism_trt.engines.manifest import ChainConfig, ModelRecord
from prism_trt.engines.measured import LatencyStats, PhaseTimes
from prism_trt.model import weights_hash

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")

from prism_trt.core.text_accuracy import NO_EXCHANGE, evaluate_text  # noqa: E402
from prism_trt.model.text_adapters import load_text_model, pretrained_path, text_source  # noqa: E402
from prism_trt.profiler.adaptive import MapSelector  # noqa: E402
from prism_trt.profiler.calibration import calibrate, calibrate_chains  # noqa: E402

NAME, N = "gpt2-pydoc", 128
# fp32 tolerance of prism-trt's comparisons (core/precision.py): |err| <= rtol * (scale + |x|), so
# a logit is off by at most 2 * rtol * max|logit| between two correct fp32 evaluations.
RTOL = Tolerance.for_precision("fp32").rtol


@pytest.fixture(scope="module")
def model():
    return load_text_model(NAME)


@pytest.fixture(scope="module")
def heldout() -> bytes:
    return read_corpus(HELDOUT_FILE)


def test_checkpoint_is_small_described_and_licensed(model):
    meta = read_meta()
    path = pretrained_path(NAME)
    assert path.stat().st_size < 5 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["checkpoint_sha256"]
    assert (TINY_GPT2_DIR / "LICENSE-PSF.txt").is_file() and (TINY_GPT2_DIR / "README.md").is_file()
    spec = model.spec
    assert (spec.family, spec.head, spec.vocab_size, spec.max_positions, spec.depth, spec.embed_dim) == \
        ("gpt2", "lm", 256, N, 4, 128)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored fp16, evaluated fp32
    with pytest.raises(ValueError, match="trained checkpoint"):
        load_text_model(NAME, n_layer=2)


@torch.no_grad()
def test_checkpoint_reproduces_its_recorded_heldout_eval(model, heldout):
    """Loss and accuracy on the whole held-out text as meta.json recorded them at training time.
    Bounds from fp32, not from this machine: each logit may move by 2*rtol*max|logit| (delta), so
    the mean cross-entropy by 2*delta (log-sum-exp is 1-Lipschitz), and only a position whose top
    two logits are within 2*delta can change its argmax."""
    recorded = read_meta()["heldout_eval"]
    nll = correct = total = near_ties = 0
    scale = 0.0
    for ids, mask, targets in TextWindows(heldout, N).batches(128):
        logits = model(ids, mask)
        valid = targets != IGNORE
        nll += float(F.cross_entropy(logits[valid].double(), targets[valid], reduction="sum"))
        correct += int((logits.argmax(-1)[valid] == targets[valid]).sum())
        total += int(valid.sum())
        scale = max(scale, float(logits.abs().max()))
        top2 = logits[valid].topk(2, dim=-1).values
        near_ties += int(((top2[:, 0] - top2[:, 1]) <= 4 * RTOL * scale).sum())
    delta = 2 * RTOL * scale
    assert total == recorded["targets"] == len(heldout) - 1
    loss_error = abs(nll / total - recorded["loss"])
    assert loss_error <= 2 * delta, f"loss {nll / total} vs {recorded['loss']}: {loss_error:.2e} > {2 * delta:.2e}"
    assert abs(correct - recorded["correct"]) <= near_ties, (correct, recorded["correct"], near_ties)
    assert recorded["accuracy"] > 0.4  # a trained model: a uniform guess gets 1/256


def test_windows_cover_every_target_once():
    data = bytes(range(97, 107))  # 10 bytes: 9 targets, windows of 4 -> 3 windows, the last padded
    windows = TextWindows(data, 4)
    assert len(windows) == 3 and windows.targets == 9
    (ids, mask, targets), = windows.batches(8)
    valid = targets != IGNORE
    assert bytes(targets[valid].tolist()) == data[1:] and bytes(ids[valid].tolist()) == data[:-1]
    assert mask.tolist() == [[1] * 4, [1] * 4, [1, 1, 0, 0]] and targets[2].tolist() == [106, IGNORE, IGNORE, IGNORE]
    assert [len(b[0]) for b in windows.batches(2)] == [2, 1] and len(TextWindows(data, 4, limit=2)) == 2


@torch.no_grad()
def test_uncompressed_plans_equal_the_reference(model, heldout):
    """P = 1, and CR = 1 (Voltage) at P = 2 and 3, reproduce the unpartitioned model: every argmax
    agrees and the loss matches within the fp32 bound of the test above."""
    windows = TextWindows(heldout, N, limit=6)
    plans = [voltage_plan(text_partition(model.spec, N, ranks)) for ranks in (1, 2, 3)]
    scale = max(float(model(ids, mask).abs().max()) for ids, mask, _ in windows.batches(6))
    for result in evaluate_text(model, windows.batches(3), plans, ["ln1", "input"], progress=False):
        assert result.cr == 1 and result.total == windows.targets
        assert result.agreement == 1.0 and result.correct == result.reference_correct
        assert abs(result.loss - result.reference_loss) <= 4 * RTOL * scale


def test_compressed_plans_approximate_later_ranks_only(model, heldout):
    windows = TextWindows(heldout, N, limit=4)
    partition = text_partition(model.spec, N, 2)
    plans = [make_segment_plan(partition, segments=L) for L in (1, 4)]
    result, isolated, _, isolated_l4 = evaluate_text(model, windows.batches(4), plans, ["ln1", NO_EXCHANGE],
                                                     progress=False)
    assert result.cr == 64 and result.total_approx == 4 * 64  # rank 1's positions
    for row in (result, isolated):  # rank 0 is exact, so every disagreement is on rank 1
        assert row.total - row.agree == row.total_approx - row.agree_approx > 0
        assert row.labelled and 0 < row.accuracy < 1 and row.loss > row.reference_loss
    # the baseline (no exchange) does not depend on L
    assert (isolated.correct, isolated.agree, isolated.nll_sum) == (isolated_l4.correct, isolated_l4.agree,
                                                                   isolated_l4.nll_sum)


def test_accuracy_command_table():
    runner = CliRunner()
    args = ["accuracy", "--model", NAME, "--ranks", "2", "--segments", "1", "--segments", "64", "--limit", "3"]
    rows = json.loads(runner.invoke(main, [*args, "--json"], catch_exceptions=False).output)
    assert [(r["ranks"], r["segments"], r["cr"]) for r in rows] == [(2, 1, 64.0), (2, 64, 1.0)]
    assert all(r["total"] == 3 * N for r in rows) and rows[1]["agreement"] == 1.0 and rows[0]["agreement"] < 1.0
    assert {"accuracy", "agreement", "agreement_approx", "loss", "perplexity", "reference_accuracy"} <= set(rows[0])
    table = runner.invoke(main, args, catch_exceptions=False).output
    assert "unpartitioned:" in table and "agreement ranks>=1" in table and "64.00" in table
    refused = runner.invoke(main, ["accuracy", "--model", "gpt2"])
    assert refused.exit_code != 0 and "trained weights" in refused.output


def _point(key: ChainKey, batch: int, bandwidth: float | None, per_sample_ms: float) -> PerfPoint:
    """A constructed (not measured) point: all its time is compute, nothing crosses the link."""
    total = per_sample_ms * batch
    phases = PhaseTimes(compute=total, wait=0.0, total=total, collectives=0 if key.mode == "local" else 4)
    return PerfPoint(key, batch, bandwidth, LatencyStats(total, total, total, 0.0, per_sample_ms), [phases])


def test_calibration_gives_text_chains_agreement_and_the_floor_applies(model):
    partition = text_partition(model.spec, N, 2)
    configs = [ChainConfig.of_plan("prism", make_segment_plan(partition, segments=L)) for L in (1, 16)]
    configs.append(ChainConfig.of_plan("voltage", voltage_plan(partition)))
    record = ModelRecord(text_source(NAME), model.spec, weights_hash(model), "text", N)
    entries = calibrate_chains(model, record, configs, "ln1", samples=4)
    coarse, fine, voltage = entries
    assert [e.key for e in entries] == [c.key for c in configs] and all(e.ranks == 2 for e in entries)
    assert voltage.agreement == 1.0 and voltage.accuracy == voltage.local_accuracy
    assert coarse.agreement < fine.agreement <= 1.0 and coarse.accuracy is not None
    assert "held-out" in coarse.calibration and "4 windows" in coarse.calibration

    # Prism L=1 is the fastest chain; the floor alone decides whether the selector may take it.
    data = PerfMap.new({"manifest_sha256": "0" * 64, "backend": "onnxruntime", "device": "cpu", "world_size": 2,
                        "model": NAME, "weights_sha256": record.weights_sha256}, {}, 2, 1, 1, 5, None)
    speed = {ChainKey.local(): 4.0, configs[2].key: 3.0, configs[1].key: 2.0, configs[0].key: 1.0}
    for batch in (1, 2, 4, 8):
        for key, ms in speed.items():
            data.points.append(_point(key, batch, None, ms * (1 + 0.1 / batch)))
    data.accuracy = entries
    below = MapSelector(data, "latency", min_agreement=(coarse.agreement + fine.agreement) / 2).decide(4)
    rejected = next(c for c in below.candidates if c.choice == configs[0].key)
    assert rejected.rejected.startswith(f"agreement {coarse.agreement:.4f} < min")
    assert below.choice == configs[1].key
    assert MapSelector(data, "latency", min_agreement=0.0).decide(4).choice == configs[0].key
    assert isinstance(entries[0], AccuracyEntry)


def test_calibrate_reads_a_text_build(text_engines):
    """`prism-trt profile`'s calibration on a real (random-weight) GPT-2 build: the model is rebuilt
    from the manifest's source, checked against its weights digest, and calibrated on random ids
    (agreement only, and said so)."""
    engines, _ = text_engines("gpt2")
    entries = calibrate(engines, samples=8)
    modes = {e.key.mode: e for e in entries}
    assert set(modes) == {"prism", "voltage"} and modes["voltage"].agreement == 1.0
    assert 0 < modes["prism"].agreement <= 1.0 and modes["prism"].accuracy is None
    assert modes["prism"].calibration.startswith("random:8 sequences")
