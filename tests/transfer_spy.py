"""Spies on the host <-> device boundary, for the test that guards device residency.

:func:`bypass_guard` records every call, from the package's code, of a torch method that moves a
tensor between memories (``cpu``, ``cuda``, ``numpy``, ``pin_memory``, ``to`` a device) anywhere
but in :mod:`prism_trt.runtime.transfers` (the boundary) or the staging modules (the exchange's
own copies, counted by the boundary): a crossing that bypasses the counter. On a CPU such a call
moves nothing, but it is still a call that would cross on a GPU.

Run as a script it is a worker rank of that test: ``python transfer_spy.py ENGINES PORT OUT``
runs rank 1 under the guard and writes its DeviceTransfers record, the bytes of each request it
was given, the bypasses found and its staging's exchange bytes per route and batch to OUT as JSON.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

MOVING_METHODS = ("cpu", "cuda", "numpy", "pin_memory", "to")
ALLOWED = ("prism_trt.runtime.transfers",)


def _names_a_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a device (not only a dtype)."""
    for value in (*args, kwargs.get("device")):
        if isinstance(value, torch.device) or (isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda")):
            return True
        if isinstance(value, torch.Tensor):  # to(other): other's device
            return True
    return False


@contextmanager
def bypass_guard(found: list[str]):
    """While active, append ``module:line Tensor.method`` to ``found`` for each bypassing call."""
    originals = {name: getattr(torch.Tensor, name) for name in MOVING_METHODS}

    def spy_on(name: str):
        original = originals[name]

        def spy(self, *args, **kwargs):
            if name != "to" or _names_a_device(args, kwargs):
                caller = sys._getframe(1)
                module = caller.f_globals.get("__name__", "")
                if module.startswith("prism_trt") and not module.startswith(ALLOWED) and "staging" not in module:
                    found.append(f"{module}:{caller.f_lineno} Tensor.{name}")
            return original(self, *args, **kwargs)

        return spy

    for name in MOVING_METHODS:
        setattr(torch.Tensor, name, spy_on(name))
    try:
        yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def request_bytes(request) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in request.values())


def worker_main(engines: Path, port: int, out: Path) -> int:
    from prism_trt.engines.manifest import rank_directory
    from prism_trt.runtime import RuntimeOptions, distributed
    from prism_trt.runtime.distributed_rank import DistributedRank
    from prism_trt.runtime.group import GroupConfig

    ranks: list[DistributedRank] = []
    requested: list[int] = []

    class SpiedRank(DistributedRank):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ranks.append(self)

        def run(self, config_index, request, *args, **kwargs):
            requested.append(request_bytes(request))
            return super().run(config_index, request, *args, **kwargs)

    distributed.DistributedRank = SpiedRank
    found: list[str] = []
    with bypass_guard(found):
        batches = distributed.run_worker(rank_directory(engines, 1), GroupConfig(1, 2, "127.0.0.1", port, 20.0),
                                         RuntimeOptions(threads=1))
    rank = ranks[0]
    depth = rank.spec.depth
    exchange = {f"{route.config.name}/{batch}": depth * (layout.d2h_bytes(batch, itemsize)
                                                         + layout.h2d_bytes(batch, itemsize))
                for route in rank.routes for layout, itemsize in [(route.staging.layout, route.staging.itemsize)]
                for batch in range(1, rank.max_batch + 1)}
    out.write_text(json.dumps({"batches": batches, "transfers": rank.transfers.to_dict(), "requested": requested,
                               "bypasses": found, "exchange": exchange}))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
