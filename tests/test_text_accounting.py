"""Accounting for text models reproduces the PRISM paper's BERT figures (prism-text.md section 4)."""

import json
import subprocess
import sys

import pytest

from prism_trt.core.accounting import text_flops_report
from prism_trt.model.text_adapters import text_spec

pytest.importorskip("transformers", reason="the text models need the 'text' extra (also in 'dev')")

# prism-text.md 4.2: BERT-base, N = 256, P = 2; L -> (comm reduction %, comp reduction %, GFLOPs/device).
# L = 1 (CR 128) is the paper's headline: 99.2 % and 51.24 %; the other points are derived there.
BERT_TABLE = {1: (99.22, 51.24, 22.38), 2: (98.44, 51.17, 22.41), 4: (96.88, 51.03, 22.48),
              8: (93.75, 50.74, 22.61), 16: (87.50, 50.16, 22.88), 32: (75.00, 49.01, 23.40),
              64: (50.00, 46.71, 24.46), 128: (0.00, 42.11, 26.58)}


def reductions(report: dict) -> dict[int, tuple[float, float, float]]:
    local = report["local"]["gflops_per_device"]
    return {entry["segments"]: (round(100 * entry["comm_reduction"], 2),
                                round(100 * (1 - entry["gflops_per_device"] / local), 2),
                                round(entry["gflops_per_device"], 2)) for entry in report["prism"]}


def test_bert_reproduces_the_paper_at_cr_128():
    report = text_flops_report(text_spec("bert-base-uncased"), 256, 2, segments=list(BERT_TABLE), cls_segment=False)
    assert reductions(report) == BERT_TABLE
    assert round(report["local"]["gflops_per_device"], 2) == 45.90
    assert round(report["voltage"]["gflops_per_device"], 2) == 26.58
    headline = report["prism"][0]
    assert headline["cr"] == 128 and headline["bytes_per_block_per_rank"] == (768 * 4, 768 * 4)
    assert report["voltage"]["bytes_per_block_per_rank"] == (128 * 768 * 4, 128 * 768 * 4)


def test_a_separate_cls_segment_costs_one_more_key():
    """prism-text.md 2.2: [CLS] as its own segment gives 51.21 %, not the paper's 51.24 %."""
    report = text_flops_report(text_spec("bert-base-uncased"), 256, 2, crs=[128])
    (entry,) = report["prism"]
    assert reductions(report)[1][1] == 51.21
    assert [r["kv_tokens"] for r in entry["per_rank"]] == [129, 130] and entry["per_rank"][0]["sent_per_block"] == 2


def test_causal_ranks_receive_only_earlier_means():
    """GPT-2, P = 3, L = 4: rank p attends to 4p means; the last rank sends nothing."""
    report = text_flops_report(text_spec("gpt2"), 12, 3, segments=[4])
    ranks = report["prism"][0]["per_rank"]
    assert [(r["tokens"], r["kv_tokens"], r["sent_per_block"], r["received_per_block"]) for r in ranks] == [
        (4, 4, 4, 0), (4, 8, 4, 4), (4, 12, 0, 8)]
    assert report["causal"] and report["prism"][0]["bytes_reduction"] == 0.0  # L = n_p: nothing saved


def test_sequence_length_is_checked():
    with pytest.raises(ValueError, match="sequence length must be in"):
        text_flops_report(text_spec("bert-base-uncased"), 513, 2)


def test_flops_cli_for_bert():
    out = subprocess.run([sys.executable, "-m", "prism_trt.cli", "flops", "--model", "bert-base-uncased",
                          "--seq-len", "256", "--ranks", "2", "--cr", "128", "--no-cls-segment", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    assert report["tokens"] == 256 and not report["cls_segment"]
    assert reductions(report)[1] == BERT_TABLE[1]
