"""Rank-0 compute of one forward: local vs Voltage vs Prism, measured side by side in one run,
against the ratio the FLOP model (prism.md section 6) predicts. Torch eager on this machine's CPU.

Goal: the measured prism/local ratio should track the FLOP ratio (within 25 %); a larger gap means
the per-rank forward wastes work the accounting does not see.
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, time_ms, write_result  # noqa: E402

from prism_trt.core import Exchange, RankForward, drive, make_partition_plan, make_segment_plan, voltage_plan  # noqa: E402
from prism_trt.core.accounting import plan_cost  # noqa: E402
from prism_trt.model import load_model  # noqa: E402

MODEL, BATCH, RANKS, CRS = "vit_small_patch16_224", 8, 2, (9.9, 3.3)


class Recording(Exchange):
    """The in-process exchange, keeping what rank 0 received before each block."""

    def __init__(self):
        self.rank0_received = []

    def means(self, ranks, sent):
        remote = super().means(ranks, sent)
        self.rank0_received.append(remote[0])
        return remote


def rank0_runner(model, plan, images):
    """A closure running rank 0's embed + blocks with the other ranks' means precomputed."""
    ranks = [RankForward(model, plan, r) for r in range(plan.ranks)]
    exchange = Recording()
    drive(ranks, [rank.patches(images) for rank in ranks], exchange)
    rank0 = ranks[0]
    patches = rank0.patches(images)

    def run():
        x, _ = rank0.embed(patches)
        for index, remote in enumerate(exchange.rank0_received):
            x, _ = rank0.block(index, x, remote)
        return x

    return run


@torch.no_grad()
def main() -> int:
    torch.manual_seed(0)
    model = load_model(MODEL)
    spec = model.spec
    images = torch.randn(BATCH, spec.in_chans, *spec.img_size)
    partition = make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, RANKS)
    plans = {"local": voltage_plan(make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, 1)),
             "voltage": voltage_plan(partition)}
    plans.update({f"prism CR {cr}": make_segment_plan(partition, cr=cr) for cr in CRS})
    rows = {}
    for label, plan in plans.items():
        timing = time_ms(rank0_runner(model, plan, images))
        cost = plan_cost(spec, plan, label.split()[0])
        rows[label] = {"rank0_gflops": cost.per_rank[0].gflops, **timing}
    local = rows["local"]
    for row in rows.values():
        row["measured_ratio_vs_local"] = row["median_ms"] / local["median_ms"]
        row["flops_ratio_vs_local"] = row["rank0_gflops"] / local["rank0_gflops"]
    payload = {"model": MODEL, "batch": BATCH, "ranks": RANKS, "rows": rows,
               "goal": "measured prism/local ratio within 25% of the FLOP ratio"}
    worst = max(abs(r["measured_ratio_vs_local"] / r["flops_ratio_vs_local"] - 1) for r in rows.values())
    payload["worst_relative_gap"] = worst
    path = write_result("rank_compute", payload)

    labels = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [rows[k]["measured_ratio_vs_local"] for k in labels], 0.4,
           label="measured (torch eager)")
    ax.bar([x + 0.2 for x in xs], [rows[k]["flops_ratio_vs_local"] for k in labels], 0.4, label="FLOP model")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("rank-0 compute / local")
    ax.set_title(f"{MODEL}, batch {BATCH}, P={RANKS}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "rank_compute.png", dpi=120)

    for label in labels:
        r = rows[label]
        print(f"{label:>14}: {r['median_ms']:8.1f} ms  measured x{r['measured_ratio_vs_local']:.3f}  "
              f"FLOPs x{r['flops_ratio_vs_local']:.3f}")
    print(f"worst gap {100 * worst:.1f}% (goal <= 25%) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
