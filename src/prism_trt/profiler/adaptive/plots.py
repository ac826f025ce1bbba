"""`prism-trt plot`: the seed 000 figures from a performance map (PNG via matplotlib)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ...core.chain_key import Mode  # noqa: E402
from ...engines.measured import PHASES  # noqa: E402
from ...engines.perfmap import PerfMap, PerfPoint  # noqa: E402
from .latency_model import TERMS  # noqa: E402


def _label(point: PerfPoint) -> str:
    return f"prism CR {point.key.cr:.3g}" if point.mode == Mode.PRISM else point.mode


def _bandwidths(data: PerfMap) -> list:
    return sorted({p.bandwidth_mbit for p in data.points if p.mode != Mode.LOCAL}, key=lambda b: (b is None, b or 0))


def _series(data: PerfMap, bandwidth) -> dict[str, list[PerfPoint]]:
    """Each chain's points at ``bandwidth`` (local: at every bandwidth) by batch, keyed by its label."""
    series: dict = {}
    for point in data.points:
        if point.mode == Mode.LOCAL or point.bandwidth_mbit == bandwidth:
            series.setdefault(point.key, []).append(point)
    return {_label(points[0]): sorted(points, key=lambda p: p.batch) for points in series.values()}


def breakdown(data: PerfMap, bandwidth, path: Path) -> None:
    """Fig. 4a: rank 0's latency breakdown, stacked, per batch for each mode."""
    series = _series(data, bandwidth)
    batches = sorted({p.batch for points in series.values() for p in points})
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(batches)), 4))
    width = 0.8 / len(series)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for s, (label, points) in enumerate(series.items()):
        by_batch = {p.batch: p for p in points}
        bottom = np.zeros(len(batches))
        for k, phase in enumerate(PHASES):
            values = np.array([by_batch[b].per_rank[0].phase(phase) if b in by_batch else 0.0 for b in batches])
            ax.bar(np.arange(len(batches)) + s * width, values, width, bottom=bottom, color=colors[k % len(colors)],
                   label=phase if s == 0 else None, edgecolor="white", linewidth=0.3)
            bottom += values
        for x, total in zip(np.arange(len(batches)) + s * width, bottom):
            ax.text(x, total, label.replace("prism ", ""), rotation=90, fontsize=6, ha="center", va="bottom")
    ax.set_xticks(np.arange(len(batches)) + width * (len(series) - 1) / 2, [str(b) for b in batches])
    ax.set_xlabel("batch")
    ax.set_ylabel("rank 0 latency (ms)")
    ax.set_title(f"latency breakdown at {bandwidth or 'loopback'} Mbit/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_sample(data: PerfMap, bandwidth, path: Path) -> None:
    """Fig. 5: per-sample latency and energy vs batch."""
    series = _series(data, bandwidth)
    fig, (lat, energy) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, points in series.items():
        lat.plot([p.batch for p in points], [p.latency.per_sample_ms for p in points], marker="o", label=label)
        joules = [p.energy_per_sample_j for p in points]
        if any(j is not None for j in joules):
            measured = [(p.batch, j) for p, j in zip(points, joules) if j is not None]
            energy.plot([b for b, _ in measured], [j for _, j in measured], marker="o", label=label)
    lat.set(xlabel="batch", ylabel="ms / sample", xscale="log", title="per-sample latency")
    energy.set(xlabel="batch", ylabel="J / sample", xscale="log", title="per-sample energy")
    if not energy.lines:
        energy.text(0.5, 0.5, "energy n/a\n(no meter on this machine)", ha="center", va="center",
                    transform=energy.transAxes)
    lat.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def vs_bandwidth(data: PerfMap, batch: int, path: Path) -> None:
    """Fig. 6: latency vs bandwidth at a fixed batch (local as a flat line)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    local = [p for p in data.points if p.mode == Mode.LOCAL and p.batch == batch]
    shaped = [b for b in _bandwidths(data) if b is not None]
    for key in sorted({p.key for p in data.points if p.mode != Mode.LOCAL}, key=lambda k: (k.mode, k.segments or 0)):
        points = sorted([p for p in data.points if p.key == key and p.batch == batch and p.bandwidth_mbit is not None],
                        key=lambda p: p.bandwidth_mbit)
        if points:
            label = _label(points[0])
            ax.plot([p.bandwidth_mbit for p in points], [p.latency.mean_ms for p in points], marker="o",
                    label=label)
    if local and shaped:
        ax.hlines(local[0].latency.mean_ms, min(shaped), max(shaped), colors="black", linestyles="--",
                  label="local")
    ax.set(xlabel="bandwidth (Mbit/s)", ylabel="latency (ms)", title=f"latency vs bandwidth, batch {batch}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decision_map(selector, batches: list[int], bandwidths: list[float], path: Path) -> None:
    """The selector's choice over (batch, bandwidth)."""
    labels, grid = [], np.zeros((len(bandwidths), len(batches)), dtype=int)
    for i, bandwidth in enumerate(bandwidths):
        for j, batch in enumerate(batches):
            label = selector.decide(batch, bandwidth).choice.label
            if label not in labels:
                labels.append(label)
            grid[i, j] = labels.index(label)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    cmap = plt.get_cmap("tab10", max(len(labels), 1))
    ax.imshow(grid, aspect="auto", origin="lower", cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5)
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(bandwidths)), ["loopback" if b is None else f"{b:g}" for b in bandwidths])
    ax.set(xlabel="batch", ylabel="bandwidth (Mbit/s)", title=f"selector choice ({selector.objective})")
    for k, label in enumerate(labels):
        ax.plot([], [], "s", color=cmap(k), label=label)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prediction_vs_measured(records: list[dict], path: Path, title: str) -> None:
    """The model's prediction of each held-out point against its measurement: the total, and each
    term (records from a report made with ``detail=True``); the diagonal is a perfect model."""
    names = ("total", "compute", "transfer", "skew")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8))
    modes = sorted({r["mode"] for r in records})
    for ax, name in zip(axes, names):
        for mode in modes:
            rows = [r for r in records if r["mode"] == mode]
            ax.scatter([r["measured"][name] for r in rows], [r["predicted"][name] for r in rows], s=14, label=mode)
        values = [v for r in records for v in (r["measured"][name], r["predicted"][name])] or [0.0, 1.0]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="black", linewidth=0.8, linestyle="--")
        ax.set(xlabel=f"measured {name} (ms)", ylabel=f"predicted {name} (ms)", title=name)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def error_per_term(reports: dict[str, dict], path: Path, title: str) -> None:
    """MAPE (left) and error share of the mean total (right) per term, one bar per held-out scheme
    or transfer in ``reports``; the naive baseline's total next to the model's."""
    names = (*TERMS, "total", "naive_total")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / max(len(reports), 1)
    x = np.arange(len(names))
    for k, (scheme, report) in enumerate(reports.items()):
        for ax, field in ((left, "mape_percent"), (right, "error_share_percent")):
            values = [report.get(name, {}).get(field) for name in names]
            ax.bar(x + k * width, [np.nan if v is None else v for v in values], width, label=scheme)
    for ax, label in ((left, "MAPE (%)"), (right, "error / mean total (%)")):
        ax.set_xticks(x + width * (len(reports) - 1) / 2, [n.replace("_", " ") for n in names], fontsize=8)
        ax.set(ylabel=label)
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(data: PerfMap, out: Path, selector=None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    bandwidths = _bandwidths(data) or [None]
    for bandwidth in bandwidths:
        tag = "loopback" if bandwidth is None else f"{bandwidth:g}mbit"
        for name, fn in (("breakdown", breakdown), ("per_sample", per_sample)):
            path = out / f"{name}_{tag}.png"
            fn(data, bandwidth, path)
            written.append(path)
    batches = sorted({p.batch for p in data.points})
    if len([b for b in bandwidths if b is not None]) > 1:
        path = out / f"vs_bandwidth_b{batches[-1]}.png"
        vs_bandwidth(data, batches[-1], path)
        written.append(path)
    if selector is not None:
        shaped = [b for b in bandwidths if b is not None] or [None]
        path = out / "decision_map.png"
        decision_map(selector, batches, shaped, path)
        written.append(path)
    return written
