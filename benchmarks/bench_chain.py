"""Per-block engine chain vs the monolithic model (same backend, P=1), and the onnxruntime chain
vs torch eager at the same thread count. Everything is measured side by side in one run, the
variants interleaved round by round so that machine noise hits them alike.

Goals (issue 4): chain / monolithic <= 1.05 at batch 1 and 16; ORT chain / torch eager <= 0.8.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from prism_trt.engines import BuildOptions, get_backend  # noqa: E402
from prism_trt.export.build import Builder, config_plans  # noqa: E402
from prism_trt.model import load_model  # noqa: E402
from prism_trt.runtime import RuntimeOptions, load_chain, run_chains_in_process  # noqa: E402
from prism_trt.runtime.request import InferenceRequest

MODEL, THREADS, BATCHES, ROUNDS, WARMUP = "vit_tiny_patch16_224", 2, (1, 16), 15, 3
GOALS = {"chain_vs_monolithic": 1.05, "ort_chain_vs_torch": 0.8}


def interleaved(variants: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


@torch.no_grad()
def main() -> int:
    torch.set_num_threads(THREADS)
    model = load_model(MODEL)
    spec = model.spec
    engines = RESULTS / "engines" / MODEL
    configs = config_plans(spec.num_tokens, spec.num_prefix_tokens, 1, [], [])
    Builder(model, {"timm": MODEL}, get_backend("onnxruntime", threads=THREADS), BuildOptions(),
            exporter="torchscript").build(engines, 1, configs, progress=False)
    options = RuntimeOptions(threads=THREADS)
    chain = load_chain(Path(engines) / "rank0", "local", options=options).__enter__()
    monolithic = load_chain(Path(engines) / "rank0", "local", options=options, use_monolithic=True).__enter__()
    rows = {}
    for batch in BATCHES:
        images = torch.randn(batch, spec.in_chans, *spec.img_size, generator=torch.Generator().manual_seed(batch))
        request = InferenceRequest.of(chain.manifest.model, images)
        samples = interleaved({
            "ort_chain": lambda request=request: run_chains_in_process([chain], request),
            "ort_monolithic": lambda request=request: monolithic.monolithic(request),
            "torch_eager": lambda images=images: model(images),
        }, ROUNDS, WARMUP)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        rows[batch] = {"median_ms": medians, "samples_ms": samples,
                       "chain_vs_monolithic": medians["ort_chain"] / medians["ort_monolithic"],
                       "ort_chain_vs_torch": medians["ort_chain"] / medians["torch_eager"]}
        print(f"batch {batch:2d}: chain {medians['ort_chain']:.1f} ms, monolithic {medians['ort_monolithic']:.1f} ms, "
              f"torch {medians['torch_eager']:.1f} ms -> chain/monolithic {rows[batch]['chain_vs_monolithic']:.3f} "
              f"(goal <= {GOALS['chain_vs_monolithic']}), chain/torch {rows[batch]['ort_chain_vs_torch']:.3f} "
              f"(goal <= {GOALS['ort_chain_vs_torch']})")
    met = {f"{goal}@{batch}": rows[batch][goal] <= limit for batch in BATCHES for goal, limit in GOALS.items()}
    path = write_result("chain", {"model": MODEL, "threads": THREADS, "rounds": ROUNDS, "goals": GOALS,
                                  "results": rows, "goals_met": met})

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ["ort_chain", "ort_monolithic", "torch_eager"]
    width = 0.25
    for i, name in enumerate(names):
        ax.bar([b + (i - 1) * width for b in range(len(BATCHES))],
               [rows[batch]["median_ms"][name] / rows[batch]["median_ms"]["ort_monolithic"] for batch in BATCHES],
               width, label=name)
    ax.axhline(GOALS["chain_vs_monolithic"], color="grey", linestyle="--", linewidth=1, label="chain goal 1.05")
    ax.set_xticks(range(len(BATCHES)), [f"batch {b}" for b in BATCHES])
    ax.set_ylabel("time / ORT monolithic")
    ax.set_title(f"{MODEL}, P=1, {THREADS} threads (median of {ROUNDS})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "chain.png", dpi=120)
    print(f"goals met: {met} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
