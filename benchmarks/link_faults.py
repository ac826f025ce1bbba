"""Link faults against a served 2-rank cluster on the tc testbed: how long to degrade, to recover, what is lost.

1. Build two small random ViTs (onnxruntime, 2 ranks): FAULT_SPEC (cheap, for the faults under load) and
   AUTO_SPEC (heavy enough that Prism beats local on a fast link on 2 ranks x 1 core, and loses on a slow one).
2. Faults, `serve --mode prism --timeout TIMEOUT_S`, two clients sending one-image requests from rank 0's
   namespace: the worker's link down for each of OUTAGES_S, LOSS_BURSTS of total loss (link flaps: this
   kernel's testbed may lack netem), and the rate dropped to SLOW for SLOW_S. After each fault the load goes
   on until prism answers again, then SETTLE_S more.
3. Auto: a map profiled on the testbed for AUTO_SPEC at AUTO_RATES, then `serve --mode auto` (online
   refinement, link probe on) with one client sending AUTO_BATCH-image requests: AUTO_PHASE_S at the fast
   rate, the same at the slow one, then fast again, then the link down for AUTO_OUTAGE_S.
4. Every answer is checked against the model (local, or the Prism simulation of the chain that answered),
   and every request must be answered exactly once. Writes benchmarks/results/link_faults.json and .png
   (copied to docs/results/).

`python link_faults.py [--no-faults | --no-auto]` (root, ip, tc). Figures per fault: degrade_s (fault to
readiness degraded), ready_s (link back to ready for good), recover_s (link back to the first request
after it answered on a distributed chain), p99/max latency of the requests in flight during the fault,
lost, duplicated, wrong (:class:`prism_trt.profiler.testbed.FaultReport`).
"""

from __future__ import annotations

import secrets
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

FAST, SLOW = "1000mbit", "10mbit"
TIMEOUT_S = 5.0  # serve --timeout: the collective timeout a WiFi deployment would set
OUTAGES_S = [2.0, 5.0, 30.0]
LOSS_BURSTS = (0.3, 0.7, 8)  # down_s, up_s, count
SLOW_S, SETTLE_S = 10.0, 3.0
AUTO_RATES, AUTO_BATCH, AUTO_PHASE_S, AUTO_OUTAGE_S = [1000.0, 10.0], 8, 25.0, 5.0
HTTP_PORT, MASTER_PORT = 8000, 29500


def _specs():
    from conftest import small_spec

    return {"fault": small_spec(img=32, depth=2),
            "auto": small_spec(img=64, patch=8, dim=192, depth=4, heads=3, head_dim=64)}


def _engines(kind: str, spec, crs: list[float]):
    from conftest import build_engines, random_model

    model = random_model(spec, seed=1)
    out = RESULTS / "engines" / f"link-faults-{kind}"
    if not (out / "rank1" / "manifest.json").exists():
        build_engines(model, out, 2, crs, source={"timm": "vit_tiny_patch16_224"}, max_batch=16)
    return model, out


class Checker:
    """Expected logits per (mode, segments) of the fixed request inputs."""

    def __init__(self, model, inputs: torch.Tensor, tokens: int):
        self.model, self.inputs, self.tokens, self.cache = model, inputs, tokens, {}

    def expected(self, mode: str, segments: int | None) -> np.ndarray:
        from prism_trt.core import make_partition_plan, make_segment_plan, simulate

        if (mode, segments) not in self.cache:
            with torch.no_grad():
                if mode == "local":
                    out = self.model(self.inputs.flatten(0, 1))
                else:
                    plan = make_segment_plan(make_partition_plan(self.tokens, 1, 2), segments=segments)
                    out = simulate(self.model, self.inputs.flatten(0, 1), plan)
            self.cache[(mode, segments)] = out.numpy().reshape(len(self.inputs), -1)
        return self.cache[(mode, segments)]

    def wrong(self, events: list[dict]) -> int:
        bad = 0
        for event in events:
            if event["kind"] != "answer" or event.get("status") != 200:
                continue
            want = self.expected(event["mode"], event.get("segments"))[event["id"] % len(self.inputs)]
            got = np.asarray(event["logits"], dtype=np.float32)
            bad += not np.allclose(got, want, rtol=1e-3, atol=1e-4)
        return bad


def _prism_answers_since(since: float, count: int = 3):
    return lambda events: sum(1 for e in events if e["kind"] == "answer" and e["sent"] >= since
                              and e.get("mode") == "prism" and not e.get("fell_back")) >= count


def _strip(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "logits"} for e in events]


def run_faults(bed, engines, checker: Checker, work: Path) -> dict:
    from prism_trt.profiler.testbed.faults import LoadRun, ServedCluster, fault_report, flap, set_link

    common = ["--engines", str(engines), "--threads", "1", "--timeout", str(TIMEOUT_S)]
    rank0 = ["--mode", "prism", "--cr", "2", "--port", str(HTTP_PORT), "--max-wait-ms", "2"]
    flat = [image.flatten().tolist() for image in checker.inputs]
    marks = []
    with ServedCluster(bed, common, rank0, work / "logs", {"PRISM_TRT_CLUSTER_TOKEN": secrets.token_hex(16)},
                       master_port=MASTER_PORT) as cluster:
        load = LoadRun(bed, HTTP_PORT, "tiny-test", flat, [1, *checker.inputs.shape[2:]], work / "load", clients=2,
                       limit=200_000, limit_s=600, pause_s=0.01)
        try:
            if not load.wait_for(_prism_answers_since(0.0, 50), 120):
                raise SystemExit(f"the cluster never answered on prism: {cluster.log(0)[-3000:]}")
            for outage in OUTAGES_S:
                down = set_link(bed, 1, up=False)
                time.sleep(outage)
                marks.append((f"link down {outage:g} s", down, set_link(bed, 1, up=True)))
                load.wait_for(_prism_answers_since(marks[-1][2]), 120)
                time.sleep(SETTLE_S)
            bursts = flap(bed, 1, *LOSS_BURSTS)
            marks.append((f"loss bursts {LOSS_BURSTS[2]} x {LOSS_BURSTS[0]:g} s", bursts[0][0], bursts[-1][1]))
            load.wait_for(_prism_answers_since(marks[-1][2]), 120)
            time.sleep(SETTLE_S)
            slow = time.monotonic()
            bed.set_bandwidth(SLOW)
            time.sleep(SLOW_S)
            bed.set_bandwidth(FAST)
            marks.append((f"rate {SLOW} for {SLOW_S:g} s", slow, time.monotonic()))
            load.wait_for(_prism_answers_since(marks[-1][2]), 120)
            time.sleep(SETTLE_S)
        finally:
            events = load.stop()
        alive = cluster.alive()
    ends = [start for _, start, _ in marks[1:]] + [time.monotonic()]
    reports = [fault_report(kind, events, start, back, end).to_dict() for (kind, start, back), end in zip(marks, ends)]
    return {"reports": reports, "ranks_alive_at_end": alive, "wrong": checker.wrong(events),
            "events": _strip(events)}


def run_auto(bed, engines, checker: Checker, work: Path) -> dict:
    from prism_trt.engines import AccuracyEntry
    from prism_trt.profiler.sampling import SamplingRule
    from prism_trt.profiler.sweep import Launcher, SweepPlan, profile
    from prism_trt.profiler.testbed.faults import LoadRun, ServedCluster, fault_report, set_link

    map_path = work / "perfmap.json"
    plan = SweepPlan.for_build(engines, [AUTO_BATCH], [4.0], AUTO_RATES, 2, 8, SamplingRule(8, 20, 0.03, 10.0))
    accuracy = [AccuracyEntry(plan.prism[0], 2, 1.0, calibration="random weights: latency-only study")]
    data = profile(engines, map_path, plan, Launcher.on_testbed(bed), accuracy=accuracy, progress=False)
    oracle = {}
    for rate in AUTO_RATES:
        measured = {p.key.label: round(p.latency.per_sample_ms, 3) for p in data.points
                    if p.batch == AUTO_BATCH and (p.mode == "local" or p.bandwidth_mbit == rate)}
        oracle[rate] = {"choice": min(measured, key=measured.get), "per_sample_ms": measured}
    bed.set_bandwidth(FAST)
    common = ["--engines", str(engines), "--threads", "1", "--timeout", str(TIMEOUT_S)]
    rank0 = ["--mode", "auto", "--map", str(map_path), "--min-agreement", "0", "--port", str(HTTP_PORT),
             "--max-wait-ms", "1"]
    flat = [request.flatten().tolist() for request in checker.inputs]
    marks = []
    with ServedCluster(bed, common, rank0, work / "logs", {"PRISM_TRT_CLUSTER_TOKEN": secrets.token_hex(16)},
                       master_port=MASTER_PORT + 1) as cluster:
        load = LoadRun(bed, HTTP_PORT, "tiny-test", flat, [AUTO_BATCH, *checker.inputs.shape[2:]], work / "load",
                       clients=1, limit=100_000, limit_s=600, pause_s=0.0)
        try:
            if not load.wait_for(lambda events: load.answered() >= 10, 180):
                raise SystemExit(f"the auto server never answered: {cluster.log(0)[-3000:]}")
            start = time.monotonic()
            time.sleep(AUTO_PHASE_S)
            slow = time.monotonic()
            bed.set_bandwidth(SLOW)
            time.sleep(AUTO_PHASE_S)
            bed.set_bandwidth(FAST)
            fast = time.monotonic()
            marks.append((f"rate {SLOW} for {AUTO_PHASE_S:g} s", slow, fast))
            time.sleep(AUTO_PHASE_S)
            down = set_link(bed, 1, up=False)
            time.sleep(AUTO_OUTAGE_S)
            marks.append((f"link down {AUTO_OUTAGE_S:g} s", down, set_link(bed, 1, up=True)))
            time.sleep(AUTO_PHASE_S)
        finally:
            events = load.stop()
        alive = cluster.alive()
    answers = [e for e in events if e["kind"] == "answer" and e.get("status") == 200]

    def batches_until(since: float, until: float, wanted) -> tuple[int | None, float | None]:
        """Requests (each one batch) sent from ``since`` until the first that ran as ``wanted`` says."""
        window = [e for e in answers if since <= e["sent"] < until]
        for index, event in enumerate(window, 1):
            if wanted(event):
                return index, event["sent"] - since
        return None, None

    off_prism = batches_until(slow, fast, lambda e: e["mode"] != "prism")
    back_on = batches_until(fast, marks[1][1], lambda e: e["mode"] == "prism" and not e.get("fell_back"))
    ends = [marks[1][1], time.monotonic()]
    reports = [fault_report(kind, events, s, b, end).to_dict() for (kind, s, b), end in zip(marks, ends)]
    return {"oracle": {str(k): v for k, v in oracle.items()},
            "oracle_changes_with_rate": len({v["choice"] for v in oracle.values()}) > 1,
            "off_prism_after_collapse": {"batches": off_prism[0], "seconds": off_prism[1]},
            "back_on_prism_after_recovery": {"batches": back_on[0], "seconds": back_on[1]},
            "reports": reports, "ranks_alive_at_end": alive, "wrong": checker.wrong(events),
            "phases": {"start": start, "slow": slow, "fast": fast}, "events": _strip(events)}


def _plot(faults: dict, auto: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = faults["reports"] if faults else []
    panels = len(reports) + (1 if auto else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(10, 2.3 * panels), squeeze=False)
    axes = axes[:, 0]
    colours = {"prism": "tab:blue", "local": "tab:orange", "voltage": "tab:green"}
    for axis, report in zip(axes, reports):
        start, back = report["start"], report["back"]
        window = [e for e in faults["events"] if e["kind"] == "answer" and start - 3 <= e["sent"] <= back + 8]
        for mode, colour in colours.items():
            points = [(e["sent"] - start, (e["answered"] - e["sent"]) * 1e3) for e in window if e.get("mode") == mode]
            if points:
                axis.scatter(*zip(*points), s=4, color=colour, label=mode)
        axis.axvspan(0, back - start, color="red", alpha=0.12, label="fault")
        axis.set_yscale("log")
        axis.set_ylabel("latency ms")
        figures = ", ".join(f"{key} {report[key]:.2f}" for key in ("degrade_s", "ready_s", "recover_s")
                            if report[key] is not None)
        axis.set_title(f"{report['kind']}: {figures}", fontsize=9)
        axis.legend(fontsize=7, loc="upper right")
    if auto:
        axis = axes[-1]
        phases = auto["phases"]
        answers = [e for e in auto["events"] if e["kind"] == "answer" and e.get("status") == 200]
        labels = sorted({e["choice"] for e in answers})
        for label in labels:
            points = [(e["sent"] - phases["start"], labels.index(label)) for e in answers if e["choice"] == label]
            axis.scatter(*zip(*points), s=6, label=label)
        axis.set_yticks(range(len(labels)), labels)
        for report in auto["reports"]:
            axis.axvspan(report["start"] - phases["start"], report["back"] - phases["start"], color="red", alpha=0.12)
        axis.set_title(f"--mode auto: {FAST} -> {SLOW} -> {FAST}, then link down {AUTO_OUTAGE_S:g} s", fontsize=9)
    axes[-1].set_xlabel("seconds from the fault")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    from common import testbed_available, write_result

    from prism_trt.profiler.testbed import Testbed, netem_available

    if not testbed_available():
        return 1
    specs = _specs()
    work = RESULTS / "link_faults"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.time()
    faults = auto = None
    if "--no-faults" not in sys.argv:
        fault_model, fault_engines = _engines("fault", specs["fault"], [2.0])
        fault_inputs = torch.randn(16, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        with Testbed(2, FAST, cpus_per_rank=1) as bed:
            faults = run_faults(bed, fault_engines, Checker(fault_model, fault_inputs, 17), work / "faults")
    if "--no-auto" not in sys.argv:
        auto_model, auto_engines = _engines("auto", specs["auto"], [4.0])
        auto_inputs = torch.randn(4, AUTO_BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(4))
        with Testbed(2, FAST, cpus_per_rank=1) as bed:
            auto = run_auto(bed, auto_engines, Checker(auto_model, auto_inputs, 65), work / "auto")
    result = {"timeout_s": TIMEOUT_S, "fast": FAST, "slow": SLOW, "netem_available": netem_available(),
              "loss_bursts": "link flaps (ip link set down/up) of the worker's veth",
              "faults": faults, "auto": auto, "seconds": time.time() - started}
    name = "link_faults" if faults else "link_faults_auto"
    path = write_result(name, result)
    png = RESULTS / f"{name}.png"
    _plot(faults, auto, png)
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, DOCS / f"{name}.png")
    for report in (faults["reports"] if faults else []) + (auto["reports"] if auto else []):
        print({key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()
               if key not in ("start", "back")})
    if faults:
        print(f"faults: wrong {faults['wrong']}, ranks alive {faults['ranks_alive_at_end']}")
    if auto:
        print({k: auto[k] for k in ("oracle", "oracle_changes_with_rate", "off_prism_after_collapse",
                                    "back_on_prism_after_recovery", "wrong", "ranks_alive_at_end")})
    print(f"-> {path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
