"""Rank 0's side of a sweep: measure a list of points on a live group and stream each result as
one JSON line (the driver merges them into the map). Runs where rank 0 runs — on loopback, or
inside rank 0's network namespace on the testbed — as ``python -m prism_trt.profiler.rank0``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..engines.manifest import compute_device, load_manifest, rank_directory
from ..runtime.api import Choice
from ..runtime.distributed import DistributedExecutor
from ..runtime.group import GroupConfig
from ..runtime.measure import measure
from .energy import detect_meter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--iface", default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--points", required=True, help="JSON list of [mode, cr, batch]")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append results to")
    parser.add_argument("--energy", default=None, help="jtop, nvml or rapl (default: the first that works)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rank_dir = rank_directory(args.engines)
    device = compute_device(load_manifest(rank_dir, verify=False)["backend"])
    meter, meter_note = detect_meter(args.energy, device)
    group = GroupConfig(0, args.world_size, args.master_addr, args.master_port, args.timeout, args.iface)
    executor = DistributedExecutor(rank_dir, group, args.threads, profile_barrier=True)
    try:
        for mode, cr, batch in json.loads(args.points):
            result = measure(executor, Choice(mode, cr), batch, args.warmup, args.repeat, meter=meter)
            result["energy_meter"] = meter.name
            result["energy_note"] = meter_note
            with open(args.out, "a") as stream:
                stream.write(json.dumps(result) + "\n")
    finally:
        executor.close()
        meter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
