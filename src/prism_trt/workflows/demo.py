"""The `prism-trt demo` pipeline: all of prism-trt on one x86 box, torn down on exit, Ctrl-C or failure.

build (P=2, two CRs + the local chain) -> 2-board testbed (network namespaces when root and tc
are available, else loopback) -> bounded profile sweep -> latency model fit -> plots -> `serve
--mode auto` on two ranks -> real requests through the KServe v2 API -> summary.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import httpx
import torch

from ..core.chain_key import Mode
from ..data import MnistTestSet, data_dir
from ..engines import BuildOptions, get_backend
from ..export.build import Builder, config_plans
from ..model import load_model
from ..profiler.adaptive import MapSelector, leave_one_out
from ..profiler.adaptive.plots import plot_all
from ..profiler.calibration import calibrate
from ..profiler.sweep import Launcher, SweepPlan, profile
from ..report import format_table
from ..runtime.group import ClusterError, free_port
from ..serve.client import wait_until_ready

CRS = (9.9, 4.95)


@dataclass
class DemoSettings:
    out: Path
    quick: bool = False
    requests: int = 64
    progress: bool = True  # progress bars (the CLI: on a terminal, and not with -q)

    @property
    def batches(self) -> list[int]:
        return [1, 4] if self.quick else [1, 4, 16]

    @property
    def bandwidths(self) -> list[float]:
        return [500.0] if self.quick else [200.0, 900.0]

    @property
    def repeat(self) -> int:
        return 3 if self.quick else 6


def step(message: str) -> None:
    click.secho(f"==> {message}", bold=True)


def _pick_model():
    checkpoint = data_dir() / "mnist" / "vit_mnist.pt"
    if checkpoint.is_file() and (checkpoint.parent / MnistTestSet.IMAGES).is_file():
        return load_model(checkpoint=checkpoint), {"checkpoint": str(checkpoint)}, checkpoint.parent
    click.echo(f"(no shared MNIST data at {checkpoint.parent}: using vit_tiny_patch16_224 with RANDOM weights, "
               f"so labels are meaningless; set PRISM_TRT_DATA to use the real checkpoint)")
    return load_model("vit_tiny_patch16_224"), {"timm": "vit_tiny_patch16_224"}, None


@contextlib.contextmanager
def _testbed_or_loopback():
    """A 2-board testbed where this machine can build one (tools, privileges and a probe namespace
    that really works), else plain loopback; either way it says which and why."""
    from ..profiler.testbed import Testbed, TestbedError, testbed_support

    ok, why = testbed_support()
    testbed = None
    if ok:
        try:
            testbed = Testbed(2, "900mbit", cpus_per_rank=1).up()
        except TestbedError as error:  # Testbed.up() removes what it made before raising
            ok, why = False, str(error)
    if not ok:
        click.echo(f"(no testbed: {why}; ranks talk over unshaped loopback)")
        yield None
        return
    try:
        click.echo(f"testbed up: ranks at {testbed.address(0)} and {testbed.address(1)}, links shaped with tc")
        yield testbed
    finally:
        testbed.down()


def _launcher(testbed) -> Launcher:
    return Launcher(2) if testbed is None else Launcher.on_testbed(testbed)


def _serve(engines: Path, perfmap: Path, min_agreement: float) -> tuple[list[subprocess.Popen], str]:
    master, http = free_port(), free_port()
    argv = [sys.executable, "-m", "prism_trt.cli", "serve", "--engines", str(engines), "--world-size", "2",
            "--master-port", str(master), "--threads", "1", "--mode", "auto", "--map", str(perfmap),
            "--min-agreement", str(min_agreement), "--port", str(http), "--max-wait-ms", "20"]
    log = open(perfmap.parent / "serve.log", "w")
    ranks = [subprocess.Popen(argv + ["--rank", str(rank)], stdout=log, stderr=subprocess.STDOUT)
             for rank in (1, 0)]
    url = f"http://127.0.0.1:{http}"
    if wait_until_ready(url, ranks):
        return ranks, url
    _stop(ranks)
    raise ClusterError(f"the server did not become ready; see {perfmap.parent / 'serve.log'}")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):  # rank 0 first: it tells the workers to stop
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _requests(url: str, model, mnist: Path | None, count: int) -> dict:
    spec = model.spec
    if mnist is not None:
        images, labels = next(MnistTestSet(mnist, spec.mean[0], spec.std[0], limit=count).batches(count))
    else:
        images = torch.randn((count, spec.in_chans, *spec.img_size), generator=torch.Generator().manual_seed(0))
        labels = None
    with torch.no_grad():
        local = model(images).argmax(-1)
    modes, latencies, answered, agree, correct = Counter(), [], 0, 0, 0
    sizes = [1, 4, 8, 2] * count
    with httpx.Client(base_url=url, timeout=60) as client:
        start = 0
        for size in sizes:
            if start >= count:
                break
            batch = images[start:start + size]
            body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                                "data": batch.flatten().tolist()}]}
            began = time.perf_counter()
            response = client.post(f"/v2/models/{spec.name}/infer", json=body)
            latencies.append((time.perf_counter() - began) * 1e3)
            response.raise_for_status()
            answer = response.json()
            predicted = torch.tensor(answer["outputs"][1]["data"])
            modes[answer["parameters"]["choice"]] += len(batch)
            answered += len(batch)
            agree += int((predicted == local[start:start + size]).sum())
            if labels is not None:
                correct += int((predicted == labels[start:start + size]).sum())
            start += size
    return {"images": answered, "agree_with_local": agree, "correct": correct if labels is not None else None,
            "local_correct": int((local == labels).sum()) if labels is not None else None,
            "modes": dict(modes), "request_ms_median": sorted(latencies)[len(latencies) // 2]}


def run_demo(settings: DemoSettings) -> dict:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    model, source, mnist = _pick_model()
    spec = model.spec
    step(f"1/6 build: {spec.name}, 2 ranks, CRs {', '.join(map(str, CRS))} + voltage + local chain")
    engines = out / "engines"
    configs = config_plans(spec.num_tokens, spec.num_prefix_tokens, 2, list(CRS), [])
    # the torchscript exporter: ~30x faster to run than dynamo, same verification
    Builder(model, source, get_backend("onnxruntime", threads=1), BuildOptions(max_batch=16),
            exporter="torchscript").build(engines, 2, configs, progress=settings.progress)
    step("2/6 calibrate: agreement of each CR with the local model")
    accuracy = calibrate(engines, mnist, samples=500 if settings.quick else 1000)
    for entry in accuracy:
        click.echo(f"  {entry.key.label}: agreement {entry.agreement:.4f}"
                   + (f", accuracy {entry.accuracy:.4f}" if entry.accuracy is not None else ""))
    perfmap_path = out / "perfmap.json"
    with _testbed_or_loopback() as testbed:
        bandwidths = settings.bandwidths if testbed is not None else [None]
        plan = SweepPlan.for_build(engines, settings.batches, list(CRS), bandwidths, warmup=1, repeat=settings.repeat)
        step(f"3/6 profile: batches {plan.batches} x {[k.label for k in plan.prism]} x bandwidths "
             f"{[b or 'loopback' for b in bandwidths]}, {plan.total_passes()} inference passes")
        data = profile(engines, perfmap_path, plan, _launcher(testbed), threads=1, timeout=60,
                       progress=settings.progress, accuracy=accuracy)
    step("4/6 fit the latency model and plot")
    fit = leave_one_out(data.points)
    # Random weights make the CRs lossy at random: allow what the calibration measured so the demo
    # shows distributed modes; with the real checkpoint the default floor applies.
    min_agreement = 0.99 if mnist is not None else 0.0
    plots = plot_all(data, out / "plots", MapSelector(data, "latency", min_agreement))
    step("5/6 serve --mode auto on two ranks (loopback) and send requests through the KServe v2 API")
    processes: list[subprocess.Popen] = []
    try:
        processes, url = _serve(engines, perfmap_path, min_agreement)
        served = _requests(url, model, mnist, 24 if settings.quick else settings.requests)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        _stop(processes)
    step("6/6 summary")
    summary = {"model": spec.name, "weights": "MNIST checkpoint" if mnist else "random (timm)",
               "network": "testbed" if data.metadata["hardware"]["network"].startswith("testbed") else "loopback",
               "served": served, "model_total_mape_percent": fit["total"]["mape_percent"],
               "points": len(data.points), "plots": [str(p) for p in plots], "perfmap": str(perfmap_path),
               "engines": str(engines), "fallbacks": "prism_fallbacks_total 0" not in metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [[label, count] for label, count in sorted(served["modes"].items())]
    click.echo(format_table(["chosen mode", "images"], rows))
    click.echo(f"requests: {served['images']} images answered, {served['agree_with_local']} agree with the local "
               f"model" + (f", {served['correct']} correct (local model: {served['local_correct']})"
                            if served["correct"] is not None else " (random weights: no accuracy)"))
    distributed = [p for p in data.points if p.mode != Mode.LOCAL]
    best = min(distributed, key=lambda p: p.latency.per_sample_ms)
    breakdown = best.per_rank[0]
    click.echo(f"fastest distributed point: {best.key.label} batch {best.batch} at "
               f"{best.bandwidth_mbit or 'loopback'} Mbit/s: {best.latency.per_sample_ms:.1f} ms/sample "
               f"(compute {breakdown.compute:.1f}, staging {breakdown.staging:.1f}, "
               f"wait {breakdown.phase('wait'):.1f}, comm {breakdown.comm:.1f} ms)")
    click.echo(f"files: engines {engines}, map {perfmap_path}, plots {out / 'plots'}, summary {out / 'summary.json'}")
    return summary


def main_demo(out: Path, quick: bool, as_json: bool = False, progress: bool = True) -> int:
    """The demo with its report on stdout, or with ``as_json`` the summary alone there (and the
    report on stderr)."""
    started = time.monotonic()
    report = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with report:
            summary = run_demo(DemoSettings(out, quick, progress=progress))
    except KeyboardInterrupt:
        click.echo("interrupted: everything started by the demo was stopped", err=True)
        return 130
    click.echo(f"demo finished in {time.monotonic() - started:.0f} s", err=as_json)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    return 0
