"""`make bench-profile`, second part: does the latency model transfer to other architectures?

Sweeps vit_small_patch16_224 (random weights; ~4x vit_tiny's compute, twice its embedding, so
twice the bytes per collective) and the shared MNIST ViT (6 blocks of width 64 on 28x28 images:
almost no compute, and a request of 3 KB per sample instead of 588 KB) on the same testbed as
profile_sweep.py, whose vit_tiny map this reads (run that first). Reports, per architecture, the
model's held-out MAPE (leave-one-out goal: <= 4 % on vit_tiny, <= 6 % on vit_small) and, for
every ordered pair A -> B, the transfer: link, staging, skew and other terms fitted on A's map,
compute alone re-fitted on B's (its ranks' measured compute, or only its local points), B's
distributed points predicted, per term and total against the naive transfer baseline.

The MNIST part is skipped with a message when the checkpoint is absent (PRISM_TRT_DATA).
`--quick`: tiny grids, results under results/quick/ (needs `profile_sweep.py --quick` first).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

from common import RESULTS, testbed_available, write_result
from profile_sweep import MODEL, Grid, build, model_report, print_report, results_dir, sweep

from prism_trt.engines import Manifest, PerfMap
from prism_trt.engines.json_record import sha256_file
from prism_trt.engines.manifest import rank_directory
from prism_trt.profiler.adaptive.evaluation import transfer_report
from prism_trt.profiler.adaptive.latency_model import request_bytes_per_sample
from prism_trt.profiler.adaptive.plots import error_per_term, prediction_vs_measured
from prism_trt.profiler.sampling import SamplingRule

SMALL = "vit_small_patch16_224"
# vit_small computes ~4x vit_tiny: batches to 8 and three rates, at most 20 runs or 6 s per point
# (~5 min); MNIST is all communication: vit_tiny's grid at three rates, 4 s per point (~3 min).
GRIDS = {SMALL: (Grid([1, 2, 4, 8], [200.0, 500.0, 900.0], SamplingRule(4, 20, 0.03, 6.0), warmup=1), 9.9),
         "vit_mnist": (Grid([1, 2, 4, 8, 16], [200.0, 500.0, 900.0], SamplingRule(6, 40, 0.02, 4.0)), 2.5)}
QUICK = Grid([1, 2], [300.0, 900.0], SamplingRule(2, 4, 0.05, 1.0), warmup=1)
# CR 9.9 is L = 10 segments per rank on 197 tokens; the MNIST ViT's 50 tokens take CR 2.5 for L = 10.


def architectures(quick: bool) -> dict:
    """name -> (model, build source, grid, cr); MNIST only where its checkpoint is."""
    from prism_trt.data import data_dir
    from prism_trt.model import load_model

    chosen = {SMALL: (load_model(SMALL), {"timm": SMALL}, *GRIDS[SMALL])}
    checkpoint = data_dir() / "mnist" / "vit_mnist.pt"
    if checkpoint.is_file():
        chosen["vit_mnist"] = (load_model(checkpoint=checkpoint),
                               {"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint)}, *GRIDS["vit_mnist"])
    else:
        print(f"MNIST ViT skipped: no checkpoint at {checkpoint} (set PRISM_TRT_DATA to the folder holding mnist/)")
    if quick:
        chosen = {name: (model, source, QUICK, cr) for name, (model, source, _, cr) in chosen.items()}
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grids, results under results/quick/ (smoke run)")
    args = parser.parse_args()
    from prism_trt.profiler.testbed import Testbed

    if not testbed_available():
        return 1
    root = results_dir(args.quick)
    tiny_map = root / "profile" / "perfmap.json"
    if not tiny_map.is_file():
        print(f"no vit_tiny map at {tiny_map}: run profile_sweep.py{' --quick' if args.quick else ''} first")
        return 1
    started, load_start = time.monotonic(), os.getloadavg()
    tiny_engines = RESULTS / "engines" / f"{MODEL}-profile"  # built by profile_sweep.py
    maps = {MODEL: (PerfMap.load(tiny_map), request_bytes_per_sample(Manifest.read(rank_directory(tiny_engines))))}
    chosen = architectures(args.quick)
    built = {name: build(model, source, name, cr) for name, (model, source, _, cr) in chosen.items()}
    widest = max(max(grid.bandwidths) for _, _, grid, _ in chosen.values())
    with Testbed(2, f"{widest:g}mbit", cpus_per_rank=1) as testbed:
        for name, (_, _, grid, cr) in chosen.items():
            out = root / f"profile_{name}"
            out.mkdir(parents=True, exist_ok=True)
            print(f"== sweeping {name} into {out}")
            data, _ = sweep(testbed, built[name][0], out, grid, cr)
            maps[name] = (data, built[name][1])
    fits = {}
    for name, (data, request_bytes) in maps.items():
        out = root / ("profile" if name == MODEL else f"profile_{name}")
        fits[name] = model_report(data, request_bytes, out, name)
        print(f"{name}: noise {fits[name]['sampling']}, compute drift {fits[name]['compute_drift_percent']} %")
        print_report(fits[name]["held_out"])
    transfers = {}
    out = root / "profile_transfer"
    out.mkdir(parents=True, exist_ok=True)
    for (a, (data_a, bytes_a)), (b, (data_b, bytes_b)) in itertools.permutations(maps.items(), 2):
        for local_only in (False, True):
            label = f"{a} -> {b} ({'local' if local_only else 'per-rank'} compute)"
            transfers[label] = transfer_report(data_a.points, data_b.points, local_only, (bytes_a, bytes_b),
                                               detail=True)
            if not local_only:
                prediction_vs_measured(transfers[label]["predictions"], out / f"{a}_to_{b}.png", label)
    error_per_term({k: v for k, v in transfers.items() if "per-rank" in k}, out / "error_per_term.png",
                   "transfer: fitted on A, compute re-measured on B (per-rank)")
    print("transfer:")
    print_report(transfers)
    loo = {name: fit["held_out"]["leave-one-out"]["total"]["mape_percent"] for name, fit in fits.items()}
    goals = {"vit_tiny leave-one-out total MAPE <= 4%": bool((loo.get(MODEL) or 1e9) <= 4.0)}
    if SMALL in loo:
        goals["vit_small leave-one-out total MAPE <= 6%"] = bool((loo[SMALL] or 1e9) <= 6.0)
    results = {"quick": args.quick, "architectures": list(maps), "model_fit": fits, "transfer": transfers,
               "leave_one_out_total_mape": loo, "goals": goals,
               "load_average": {"start": load_start, "end": os.getloadavg()}, "wall_s": time.monotonic() - started}
    path = write_result("quick/profile_transfer" if args.quick else "profile_transfer", results)
    print("leave-one-out total MAPE:", loo, "goals:", goals)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
