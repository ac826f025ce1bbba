"""Micro-batches in flight vs the batch run whole: two ranks pinned to one core each on loopback.

vit_tiny_patch16_224 (random weights), onnxruntime engines with one intra-op thread, Prism CR 9.9
and Voltage on 2 ranks; rank 0 runs in this process pinned to core 0 (``sched_setaffinity``: its
GLOO threads inherit it), the worker is a `prism-trt run` pinned to core 1 with ``taskset``; local
runs on rank 0's core alone. Every round times one batch of each variant in turn (local, then each
distributed mode at every micro-batch count: rank 0's choice travels with the batch header), so
drift on the host lands on all of them alike. No barrier: comm is the exchange time compute did not
hide, the wait for the slower rank included — what the micro-batches are meant to hide.

Writes results/overlap.json and results/overlap.png (latency over local per batch; rank 0's
breakdown at the largest batch). ``--quick``: two rounds of batches 2 and 4 (a smoke run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from prism_trt.core.drive import micro_batch_sizes  # noqa: E402
from prism_trt.engines import BuildOptions, ChainKey, get_backend  # noqa: E402
from prism_trt.engines.measured import PHASES, PhaseTimes  # noqa: E402
from prism_trt.export.build import Builder, config_plans  # noqa: E402
from prism_trt.runtime import RuntimeOptions  # noqa: E402
from prism_trt.runtime.distributed import DistributedExecutor  # noqa: E402
from prism_trt.runtime.group import GroupConfig, free_port  # noqa: E402
from prism_trt.runtime.measure import example_request  # noqa: E402

MODEL, CR = "vit_tiny_patch16_224", 9.9
BATCHES, MICRO, WARMUP, ROUNDS = (2, 8, 16), (1, 2, 4), 3, 30
QUICK = (2, 4), (1, 2), 1, 2


def build():
    from prism_trt.model import load_model

    model = load_model(MODEL)
    spec = model.spec
    engines = RESULTS / "engines" / f"{MODEL}-p2"
    builder = Builder(model, {"timm": MODEL}, get_backend("onnxruntime", threads=1), BuildOptions(),
                      exporter="torchscript")
    builder.build(engines, 2, config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, [CR], []), progress=False)
    return engines


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"mean_ms": statistics.fmean(ordered), "p50_ms": statistics.median(ordered),
            "p90_ms": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
            "stdev_ms": statistics.stdev(ordered) if len(ordered) > 1 else 0.0, "n": len(ordered)}


def measure_batch(executor: DistributedExecutor, batch: int, micro: tuple[int, ...], warmup: int, rounds: int) -> dict:
    """Every variant of one batch size, interleaved round by round; rank 0's latency samples and
    each rank's mean phases per variant. ``local/mN`` is the local chain run over the same cut one
    micro-batch after another: what smaller batches alone change, without anything in flight."""
    distributed = [(f"{key.mode}/m{m}", key, m) for key in (executor.key_for("prism", CR), ChainKey.voltage())
                   for m in micro if m <= batch]
    variants = [(f"local/m{m}", ChainKey.local(), m) for m in micro if m <= batch] + distributed
    requests = {size: example_request(executor.manifest.model, size) for m in micro
                for size in micro_batch_sizes(batch, m)}
    samples: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    phases: dict[str, list[list[PhaseTimes]]] = {name: [] for name, _, _ in variants}
    for round_ in range(warmup + rounds):
        for name, key, m in variants:
            executor.micro_batches = 1 if key.mode == "local" else m
            cuts = micro_batch_sizes(batch, m) if key.mode == "local" else [batch]
            results = [executor.infer(requests[size], key, gather_timings=True) for size in cuts]
            if any(result.fell_back for result in results):
                raise RuntimeError(f"{name} at batch {batch} fell back to local: the worker went away")
            if round_ >= warmup:
                samples[name].append(sum(result.timings.total for result in results))
                if len(results) == 1:
                    phases[name].append(results[0].per_rank or [results[0].timings])
    out = {}
    for name, _, m in variants:
        ranks = len(phases[name][0]) if phases[name] else 0
        out[name] = {"micro_batches": m, "latency": summary(samples[name]), "samples_ms": samples[name],
                     "per_rank": [PhaseTimes.mean([run[r] for run in phases[name]]).to_dict() for r in range(ranks)]}
    local = out["local/m1"]["latency"]
    for row in out.values():
        row["vs_local_mean"] = row["latency"]["mean_ms"] / local["mean_ms"]
        row["vs_local_p50"] = row["latency"]["p50_ms"] / local["p50_ms"]
    return out


def plot(results: dict, batches: tuple[int, ...], micro: tuple[int, ...], path) -> None:
    fig, (ratio_ax, phase_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / (2 * len(micro))
    x = np.arange(len(batches))
    colours = {m: f"C{i}" for i, m in enumerate(micro)}
    for offset, (mode, m) in enumerate((mode, m) for mode in ("prism", "voltage") for m in micro):
        values = [results[str(b)].get(f"{mode}/m{m}", {}).get("vs_local_mean", np.nan) for b in batches]
        ratio_ax.bar(x + (offset - len(micro) + 0.5) * width, values, width, color=colours[m],
                     label=f"{mode}, {m} micro-batch{'es' if m > 1 else ''}", hatch="" if mode == "prism" else "//",
                     edgecolor="white" if mode == "voltage" else None)
    for m in micro[1:]:
        values = [results[str(b)].get(f"local/m{m}", {}).get("vs_local_mean", np.nan) for b in batches]
        ratio_ax.plot(x, values, marker="_", markersize=40, linestyle="none", color=colours[m],
                      label=f"local, cut in {m}, one after another")
    ratio_ax.axhline(1.0, color="black", linewidth=0.8)
    ratio_ax.set_xticks(x, [f"batch {b}" for b in batches])
    ratio_ax.set_ylabel("mean latency / local (whole batch)")
    ratio_ax.legend(fontsize=7, loc="upper left", ncol=2)
    ratio_ax.set_ylim(0, 1.8)
    ratio_ax.set_title("over local, lower is better (voltage hatched)")
    largest = results[str(batches[-1])]
    names = [name for name in largest if not name.startswith("local")]
    bottom = np.zeros(len(names))
    for phase in PHASES:
        values = np.array([largest[name]["per_rank"][0][phase] or 0.0 for name in names])
        phase_ax.bar(names, values, bottom=bottom, label=phase)
        bottom += values
    phase_ax.axhline(largest["local/m1"]["latency"]["mean_ms"], color="black", linestyle="--", label="local")
    phase_ax.set_ylabel("rank 0, mean ms")
    phase_ax.set_title(f"rank 0's phases, batch {batches[-1]} (mN: N micro-batches)")
    phase_ax.tick_params(axis="x", labelsize=8)
    phase_ax.legend(fontsize=7)
    fig.suptitle(f"{MODEL}, 2 ranks pinned one core each, loopback, 1 thread, no barrier")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two rounds of batches 2 and 4 (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help=f"timed rounds per batch (default {ROUNDS})")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the last JSON")
    args = parser.parse_args()
    if args.plot_only:
        import json

        name = "quick/overlap" if args.quick else "overlap"
        data = json.loads((RESULTS / f"{name}.json").read_text())
        batches = tuple(int(b) for b in data["batches"])
        micro = tuple(sorted({row["micro_batches"] for b in data["batches"].values() for row in b.values()}))
        plot(data["batches"], batches, micro, RESULTS / f"{name}.png")
        return 0
    batches, micro, warmup, rounds = QUICK if args.quick else (BATCHES, MICRO, WARMUP, ROUNDS)
    rounds = args.rounds or rounds
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        print("needs taskset and two cores (one per rank)")
        return 1
    engines = build()
    started, load_start = time.monotonic(), os.getloadavg()
    os.sched_setaffinity(0, {0})
    port = free_port()
    worker = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "prism_trt.cli", "run", "--engines",
                               str(engines), "--rank", "1", "--world-size", "2", "--master-port", str(port),
                               "--threads", "1", "--timeout", "120"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = {}
    try:
        executor = DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, 120.0),
                                       RuntimeOptions(threads=1))
        try:
            for batch in batches:
                results[str(batch)] = measure_batch(executor, batch, micro, warmup, rounds)
                for name, row in results[str(batch)].items():
                    latency = row["latency"]
                    print(f"B={batch:2d} {name:>10}: mean {latency['mean_ms']:7.1f} ms, p50 {latency['p50_ms']:7.1f} "
                          f"({row['vs_local_mean']:.2f} / {row['vs_local_p50']:.2f} x local) "
                          + (f"compute {row['per_rank'][0]['compute']:.1f} comm {row['per_rank'][0]['comm']:.1f}"
                             if row["per_rank"] else ""))
        finally:
            executor.close()
    finally:
        worker.wait(timeout=120)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                      None)
    (RESULTS / "quick").mkdir(parents=True, exist_ok=True)
    path = write_result("quick/overlap" if args.quick else "overlap", {
        "model": MODEL, "cr": CR, "ranks": 2, "threads_per_rank": 1, "pinned": "rank 0 on core 0, rank 1 on core 1",
        "network": "loopback", "warmup": warmup, "rounds": rounds, "cpu": model_name, "cpus": os.cpu_count(),
        "load_average": {"start": load_start, "end": os.getloadavg()}, "wall_s": time.monotonic() - started,
        "batches": results})
    plot(results, batches, micro, RESULTS / ("quick/overlap.png" if args.quick else "overlap.png"))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
