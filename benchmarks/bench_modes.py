"""Latency breakdown of local vs Voltage vs Prism on two ranks over loopback (seed 000 Table 2 /
Fig. 4 style): compute, staging (D2H + H2D), wait (skew, from a barrier before each collective),
transfer and other, per rank, at batch 1 and 16. One worker process + rank 0 here, one thread each.

This host is one 2-core x86 machine with loopback networking: the figures show the software
overheads of the runtime, not a board's (no GPU staging, no WiFi); see the testbed for bandwidth.
"""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from prism_trt.engines import BuildOptions, ChainKey, get_backend  # noqa: E402
from prism_trt.engines.measured import PHASES  # noqa: E402
from prism_trt.export.build import Builder, config_plans  # noqa: E402
from prism_trt.model import load_model  # noqa: E402
from prism_trt.runtime import RuntimeOptions  # noqa: E402
from prism_trt.runtime.distributed import DistributedExecutor  # noqa: E402
from prism_trt.runtime.group import GroupConfig, free_port  # noqa: E402
from prism_trt.runtime.measure import measure  # noqa: E402

MODEL, CR, BATCHES, WARMUP, REPEAT = "vit_tiny_patch16_224", 9.9, (1, 16), 2, 10


def main() -> int:
    model = load_model(MODEL)
    spec = model.spec
    engines = RESULTS / "engines" / f"{MODEL}-p2"
    configs = config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, [CR], [])
    Builder(model, {"timm": MODEL}, get_backend("onnxruntime", threads=1), BuildOptions(),
            exporter="torchscript").build(engines, 2, configs, progress=False)
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines), "--rank", "1",
                               "--world-size", "2", "--master-port", str(port), "--threads", "1", "--timeout", "60"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    rows = []
    try:
        executor = DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, 60.0),
                                       RuntimeOptions(threads=1, profile_barrier=True))
        try:
            for batch in BATCHES:
                for choice in (ChainKey.local(), ChainKey.voltage(), executor.key_for("prism", CR)):
                    result = measure(executor, choice, batch, WARMUP, REPEAT).to_dict()
                    rows.append(result)
                    lat = result["latency"]
                    print(f"{choice.label:>13} B={batch:2d}: {lat['mean_ms']:7.1f} ms "
                          f"({lat['per_sample_ms']:.1f} ms/sample) " + "  ".join(
                              f"{p}={result['per_rank'][0][p] or 0:.1f}" for p in PHASES))
        finally:
            executor.close()
    finally:
        worker.wait(timeout=60)
    path = write_result("modes", {"model": MODEL, "cr": CR, "ranks": 2, "threads_per_rank": 1, "rows": rows,
                                  "note": "rank 0 breakdown in per_rank[0]; wait = barrier skew, comm = transfer"})

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(10, 3.8))
    for ax, batch in zip(np.atleast_1d(axes), BATCHES):
        subset = [r for r in rows if r["batch"] == batch]
        labels = [f"{r['mode']}" + (f"\nCR {r['cr']:.3g}" if r["mode"] == "prism" else "") for r in subset]
        bottom = np.zeros(len(subset))
        for phase in PHASES:
            values = np.array([r["per_rank"][0][phase] or 0.0 for r in subset])
            ax.bar(labels, values, bottom=bottom, label=phase)
            bottom += values
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("rank 0 latency (ms)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"{MODEL}, 2 ranks over loopback, 1 thread each (mean of {REPEAT})")
    fig.tight_layout()
    fig.savefig(RESULTS / "modes.png", dpi=120)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
