import json
import subprocess
import sys

import pytest

from prism_trt.core.accounting import flops_report
from prism_trt.model import timm_spec

# seed 000 Table 3 (ViT-B/16, N=197, P=2)
PAPER_LOCAL, PAPER_VOLTAGE = 35.15, 20.37
PAPER_PRISM = {9.9: (17.54, 0.899), 4.95: (17.86, 0.798), 3.3: (18.18, 0.697)}


@pytest.fixture(scope="module")
def table3():
    return flops_report(timm_spec("vit_base_patch16_224"), 2, crs=list(PAPER_PRISM))


def test_table3_gflops(table3):
    assert table3["local"]["gflops_per_device"] == pytest.approx(PAPER_LOCAL, abs=0.05)
    assert table3["voltage"]["gflops_per_device"] == pytest.approx(PAPER_VOLTAGE, abs=0.05)
    for entry in table3["prism"]:
        gflops, reduction = PAPER_PRISM[entry["cr"]]
        assert entry["gflops_per_device"] == pytest.approx(gflops, abs=0.05)
        assert 100 * entry["comm_reduction"] == pytest.approx(100 * reduction, abs=0.1)


def test_table3_bytes(table3):
    # B * L_p * D * 4 bytes: rank 0 sends 10 segments + CLS, rank 1 sends 10 segments
    assert table3["prism"][0]["segments"] == 10
    assert table3["prism"][0]["bytes_per_block_per_rank"] == (11 * 768 * 4, 10 * 768 * 4)
    assert table3["voltage"]["bytes_per_block_per_rank"] == (99 * 768 * 4, 98 * 768 * 4)
    assert table3["local"]["per_rank"][0]["kv_tokens"] == 197
    assert [r["kv_tokens"] for r in table3["prism"][0]["per_rank"]] == [109, 109]


def test_flops_cli_json_through_console_script():
    out = subprocess.run([sys.executable, "-m", "prism_trt.cli", "flops", "--model", "vit_base_patch16_224",
                          "--ranks", "2", "--cr", "9.9", "--cr", "4.95", "--cr", "3.3", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    assert set(report) >= {"local", "voltage", "prism"}
    assert [round(p["gflops_per_device"], 2) for p in report["prism"]] == [17.54, 17.86, 18.18]
    for entry in report["prism"]:
        assert {"cr", "segments", "gflops_per_device", "comm_reduction", "bytes_per_block_per_rank"} <= set(entry)


def test_flops_cli_reports_bad_plan():
    out = subprocess.run([sys.executable, "-m", "prism_trt.cli", "flops", "--model", "vit_base_patch16_224",
                          "--ranks", "2", "--cr", "0.5"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "CR must be between 1" in out.stderr and "Traceback" not in out.stderr
