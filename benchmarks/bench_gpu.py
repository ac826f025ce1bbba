"""The GPU path at engine speed: where the time of a forward goes on one NVIDIA GPU.

1. P = 1 forward, medians of interleaved rounds, at batches 1 / 16 / 64: the chain of stages fed a
   host request, the chain fed a device request, the chain with CUDA graphs, the monolithic engine
   (all onnxruntime CUDA EP, fp32), torch fp32 eager and torch fp16 autocast.
2. ``prism-trt run`` local / voltage / prism at batches 1 and 16, two ranks sharing the GPU: rank
   0 here, rank 1 a ``prism-trt run`` worker process (latency and each rank's compute).
3. Staging vs the pinned-memcpy peak for both staging kinds (``staging_gpu.measure_staging``).

The ratios the design aims for are computed from these figures in the same run; where a figure
could not be measured it is null, and so is every ratio built from it ("not measured").

Sized to finish in under 4 minutes on one GPU: vit_small_patch16_224 cut to ``--depth`` blocks
(6), built without per-stage verification (the GPU tests verify engines). ``--dry-run`` runs the
same code on the CPU with a tiny random ViT in seconds and writes the same JSON / PNG with every
GPU figure null (CI runs it). Needs onnxruntime-gpu on a GPU; writes results/bench_gpu.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import matplotlib
import torch
from staging_gpu import measure_staging

from prism_trt.engines import BuildOptions, ChainKey, get_backend
from prism_trt.export.build import Builder, config_plans
from prism_trt.runtime import RuntimeOptions, load_chain, run_chains_in_process
from prism_trt.runtime.distributed import DistributedExecutor
from prism_trt.runtime.group import GroupConfig, free_port
from prism_trt.runtime.measure import measure
from prism_trt.runtime.request import InferenceRequest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODEL, DEPTH, CR, DRY_RUN_CR = "vit_small_patch16_224", 6, 9.9, 3.0
TABLE_BATCHES, RUN_BATCHES, STAGING_BATCHES = (1, 16, 64), (1, 16), (1, 8, 16, 32)
COLUMNS = ("chain_host_input", "chain_device_input", "chain_cuda_graphs", "ort_monolithic", "torch_fp32_eager",
           "torch_fp16_autocast")
#: ratio -> (bound, "<=" or ">="): the issue's goals, each checked on figures of one run
GOALS = {"local_vs_monolithic@1": (1.10, "<="), "local_vs_monolithic@16": (1.10, "<="),
         "device_chain_vs_monolithic@1": (1.30, "<="), "device_chain_vs_monolithic@16": (1.05, "<="),
         "prism_rank_compute_vs_local@16": (0.65, "<="), "staging_fraction_of_peak@8+ (worst)": (0.80, ">=")}


def tiny_model():
    """The dry run's model: a random 2-block ViT on 32 x 32 images (seconds on a CPU)."""
    from prism_trt.model import PrismViT, ViTSpec

    torch.manual_seed(0)
    spec = ViTSpec(name="tiny-dry-run", img_size=(32, 32), patch_size=(8, 8), in_chans=3, num_prefix_tokens=1,
                   embed_dim=32, depth=2, num_heads=2, head_dim=16, mlp_hidden_dim=64, mlp_act="gelu", norm_eps=1e-6,
                   qkv_bias=True, pre_norm=False, final_norm=True, pool="token", fc_norm=False, num_classes=5,
                   mean=(0.5,) * 3, std=(0.5,) * 3)
    return PrismViT(spec).eval()


def gpu_model(depth: int):
    from prism_trt.model.adapters import create_timm, from_timm

    return from_timm(create_timm(MODEL, depth=depth), f"{MODEL}-depth{depth}")


def build(model, out: Path, provider: str, max_batch: int, cr: float) -> Path:
    spec = model.spec
    configs = config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, [cr], [])
    options = BuildOptions(precision="fp32", opt_batch=min(16, max_batch), max_batch=max_batch)
    started = time.perf_counter()
    Builder(model, {"benchmark": spec.name}, get_backend("onnxruntime", provider, threads=1), options,
            exporter="torchscript", verify=False).build(out, 2, configs, progress=False)
    print(f"built {spec.name} for two ranks in {time.perf_counter() - started:.0f} s")
    return out


def interleaved_medians(variants: dict, rounds: int, warmup: int, synchronize) -> dict[str, float | str]:
    """Median ms per variant over ``rounds`` interleaved runs, each ended by ``synchronize``; a
    variant that cannot run here gives its error instead."""
    usable: dict = {}
    medians: dict[str, float | str] = {}
    for name, fn in variants.items():
        try:
            for _ in range(warmup):
                fn()
            synchronize()
            usable[name] = fn
        except Exception as error:  # an EP option this onnxruntime lacks: say so, measure the rest
            medians[name] = f"unavailable: {type(error).__name__}: {error}"
    samples: dict[str, list[float]] = {name: [] for name in usable}
    for _ in range(rounds):
        for name, fn in usable.items():
            start = time.perf_counter()
            fn()
            synchronize()
            samples[name].append((time.perf_counter() - start) * 1e3)
    medians.update({name: statistics.median(values) for name, values in samples.items()})
    return medians


@torch.no_grad()
def forward_table(model, engines: Path, device: str, batches, rounds: int, warmup: int) -> dict[int, dict]:
    spec = model.spec
    on_gpu = device != "cpu"
    options = RuntimeOptions(threads=None if on_gpu else 1, device=device)
    chain = load_chain(engines / "rank0", "local", options=options).__enter__()
    monolithic = load_chain(engines / "rank0", "local", options=options, use_monolithic=True).__enter__()
    graphs = None
    if on_gpu:
        try:
            graphs = load_chain(engines / "rank0", "local", options=RuntimeOptions(device=device, cuda_graphs=True),
                                ).__enter__()
        except Exception as error:
            print(f"CUDA graphs unavailable: {error}")
    reference = model.to(device)
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    rows = {}
    for batch in batches:
        images = torch.randn(batch, spec.in_chans, *spec.img_size, generator=torch.Generator().manual_seed(batch))
        host = InferenceRequest.of(chain.manifest.model, images)
        on_device = InferenceRequest.of(chain.manifest.model, images.to(device))

        def autocast(images=on_device.tensors):
            with torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.float16 if on_gpu else torch.bfloat16):
                return reference(*images.values())

        variants = {
            "chain_host_input": lambda r=host: run_chains_in_process([chain], r),
            "chain_device_input": lambda r=on_device: run_chains_in_process([chain], r),
            "ort_monolithic": lambda r=on_device: monolithic.monolithic(r),
            "torch_fp32_eager": lambda r=on_device: reference(*r.tensors.values()),
            "torch_fp16_autocast": autocast,
        }
        if graphs is not None:
            variants["chain_cuda_graphs"] = lambda r=on_device: run_chains_in_process([graphs], r)
        rows[batch] = {column: None for column in COLUMNS} | interleaved_medians(variants, rounds, warmup, synchronize)
        print(f"batch {batch}: {rows[batch]}")
    for opened in (chain, monolithic, graphs):
        if opened is not None:
            opened.__exit__(None, None, None)
    return rows


def run_modes(engines: Path, device: str, batches, repeat: int, warmup: int, cr: float) -> list[dict]:
    """`prism-trt run` on two ranks sharing the device: rank 0 here, rank 1 a worker process."""
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "prism_trt.cli", "run", "--engines", str(engines), "--rank", "1",
                               "--world-size", "2", "--master-port", str(port), "--device", device, "--timeout", "120"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    rows = []
    try:
        executor = DistributedExecutor(engines / "rank0", GroupConfig(0, 2, "127.0.0.1", port, 120.0),
                                       RuntimeOptions(device=device))
        try:
            for batch in batches:
                for key in (ChainKey.local(), ChainKey.voltage(), executor.key_for("prism", cr)):
                    result = measure(executor, key, batch, warmup, repeat).to_dict()
                    rows.append({"mode": key.label, "batch": batch, "mean_ms": result["latency"]["mean_ms"],
                                 "compute_ms": [rank["compute"] for rank in result["per_rank"]],
                                 "fell_back": result["fell_back"]})
                    print(rows[-1])
        finally:
            executor.close()
    finally:
        worker.wait(timeout=120)
    return rows


def ratio(numerator, denominator) -> float | None:
    if isinstance(numerator, (int, float)) and isinstance(denominator, (int, float)) and denominator > 0:
        return numerator / denominator
    return None


def goals(table: dict, modes: list[dict], staging: list[dict]) -> dict[str, float | None]:
    """The design's ratios from this run's figures; None where a figure is missing (not measured)."""
    local = {r["batch"]: r for r in modes if r["mode"] == "local"}
    prism = {r["batch"]: r for r in modes if r["mode"].startswith("prism")}
    out: dict[str, float | None] = {}
    for batch in (1, 16):
        row = table.get(batch, {})
        out[f"local_vs_monolithic@{batch}"] = ratio(local.get(batch, {}).get("mean_ms"), row.get("ort_monolithic"))
        out[f"device_chain_vs_monolithic@{batch}"] = ratio(row.get("chain_device_input"), row.get("ort_monolithic"))
        out[f"cuda_graphs_vs_device_chain@{batch}"] = ratio(row.get("chain_cuda_graphs"), row.get("chain_device_input"))
    computes = prism.get(16, {}).get("compute_ms") or [None]
    out["prism_rank_compute_vs_local@16"] = ratio(max(computes, key=lambda c: c or 0),
                                                 (local.get(16, {}).get("compute_ms") or [None])[0])
    fractions = [r["fraction_of_peak"] for r in staging if r.get("batch", 0) >= 8 and "fraction_of_peak" in r]
    out["staging_fraction_of_peak@8+ (worst)"] = min(fractions) if fractions else None
    return out


def goals_met(ratios: dict[str, float | None]) -> dict[str, bool | None]:
    """Each goal met or missed; None where its ratio was not measured."""
    met: dict[str, bool | None] = {}
    for name, (bound, sense) in GOALS.items():
        value = ratios.get(name)
        met[name] = None if value is None else (value <= bound if sense == "<=" else value >= bound)
    return met


def nulled(value):
    """Every figure of a dry run as null: they were taken on a CPU and say nothing about a GPU."""
    if isinstance(value, dict):
        return {key: nulled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [nulled(item) for item in value]
    return None if isinstance(value, float) else value


def plot(table: dict, modes: list[dict], title: str, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    batches = sorted(table)
    width = 0.8 / len(COLUMNS)
    for i, column in enumerate(COLUMNS):
        values = [table[b].get(column) if isinstance(table[b].get(column), float) else 0.0 for b in batches]
        left.bar([j + i * width for j in range(len(batches))], values, width, label=column)
    left.set_xticks([j + 0.4 for j in range(len(batches))], [f"batch {b}" for b in batches])
    left.set_ylabel("median ms (0: not measured)")
    left.set_title("P = 1 forward", fontsize=9)
    left.legend(fontsize=7)
    labels = [f"{r['mode']}\nB={r['batch']}" for r in modes]
    right.bar(labels, [r["mean_ms"] if isinstance(r["mean_ms"], float) else 0.0 for r in modes])
    right.set_ylabel("mean ms (0: not measured)")
    right.set_title("prism-trt run, two ranks on one GPU", fontsize=9)
    right.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU; every GPU figure null")
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"blocks of {MODEL} to keep")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="where engines are built (default under results/)")
    parser.add_argument("--results", type=Path, default=None, help="where the JSON and PNG go (default results/)")
    args = parser.parse_args(argv)
    if args.results is not None:
        common.RESULTS = args.results
    dry_run = args.dry_run
    if not dry_run and not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to measure (run with --dry-run to exercise the script)")
        return 1
    started = time.perf_counter()
    model = tiny_model() if dry_run else gpu_model(args.depth)
    device, provider = ("cpu", "cpu") if dry_run else ("cuda:0", "cuda")
    rounds, warmup = (2, 1) if dry_run else (args.rounds, 3)
    table_batches, run_batches = ((1, 2), (1, 2)) if dry_run else (TABLE_BATCHES, RUN_BATCHES)
    cr = DRY_RUN_CR if dry_run else CR  # the tiny model has 16 patches: at most 8 segments a rank
    engines = build(model, args.out or common.RESULTS / "engines" / f"gpu-{model.spec.name}", provider,
                    max(table_batches), cr)
    table = forward_table(model, engines, device, table_batches, rounds, warmup)
    modes = run_modes(engines, device, run_batches, rounds if not dry_run else 2, warmup, cr)
    staging = measure_staging(batches=(1, 2) if dry_run else STAGING_BATCHES, repeat=rounds, dry_run=dry_run)
    if dry_run:
        table, modes, staging = nulled(table), nulled(modes), nulled(staging)
    gpu = None if dry_run else torch.cuda.get_device_name(0)
    import onnxruntime as ort

    ratios = goals(table, modes, staging)
    payload = {"gpu": gpu, "dry_run": dry_run, "model": model.spec.name, "depth": model.spec.depth,
               "onnxruntime": ort.__version__, "precision": "fp32", "cr": cr, "rounds": rounds,
               "columns": list(COLUMNS), "forward_ms": {str(b): row for b, row in table.items()},
               "run_modes": modes, "staging": staging,
               "goals": {name: f"{sense} {bound}" for name, (bound, sense) in GOALS.items()},
               "ratios": ratios, "goals_met": goals_met(ratios),
               "seconds": time.perf_counter() - started,
               "note": "null: not measured (a dry run, or a variant this machine cannot run)"}
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    png = common.RESULTS / "bench_gpu.png"
    plot(table, modes, f"{model.spec.name}, fp32, onnxruntime CUDA EP ({gpu or 'dry run: not measured'})", png)
    path = common.write_result("bench_gpu", payload)
    print(f"-> {path}, {png} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
