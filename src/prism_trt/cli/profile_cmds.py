"""Profiler commands: profile (and the rank-0 side of its sweep), select, model fit, plot."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from .common import FiniteFloat, group_options, list_option, main
from .output import show_progress


def sampling_options(command):
    """--max-repeat, --target-ci and --point-budget: when to stop timing a point."""
    command = click.option("--point-budget", type=FiniteFloat(min=0.1), default=60.0, show_default=True,
                           help="Seconds of timed runs per point at most.")(command)
    command = click.option("--target-ci", type=FiniteFloat(min=0), default=0.02, show_default=True,
                           help="Stop once the median's 95 % CI half-width is this share of it.")(command)
    return click.option("--max-repeat", type=click.IntRange(min=1), default=100, show_default=True,
                        help="Timed runs per point at most (at least --repeat).")(command)


def _rule(repeat: int, max_repeat: int, target_ci: float, point_budget: float):
    from ..profiler.sampling import SamplingRule

    return SamplingRule(repeat, max(repeat, max_repeat), target_ci, point_budget)


@main.command()
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="The build directory (with rank0/ .. rankN/).")
@list_option("--batch", "batches", kind=int, default=(1, 2, 4, 8, 16, 32), show_default=True, help="Batch sizes.")
@list_option("--cr", "crs", help="Compression rates to profile [default: every prism CR built].")
@list_option("--bandwidth", "bandwidths",
             help="Link rates in Mbit/s, e.g. 200,340,500,700,900: runs the ranks in a tc-shaped testbed "
                  "(needs root). Without it, ranks talk over unshaped loopback.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed runs before each point's timed runs.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True,
              help="The least timed runs per point.")
@sampling_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Performance map JSON.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Threads (cores) per rank.")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=1), default=60.0, show_default=True,
              help="Seconds before a collective (or joining the group) fails.")
@click.option("--calib-data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Calibration images for the agreement of each CR [default: MNIST test set for the bundled "
                   "checkpoint, random inputs for random-weight models].")
@click.option("--calib-samples", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images (or random inputs) the agreement of each CR is measured on.")
@click.option("--energy", type=click.Choice(["jtop", "nvml", "rapl"]), default=None,
              help="Energy meter [default: the first that works here; none -> energy is n/a].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (points, map file, energy meter).")
def profile(engines, batches, crs, bandwidths, warmup, repeat, max_repeat, target_ci, point_budget, out, threads,
            timeout_s, calib_data, calib_samples, energy, as_json):
    """Sweep batch x CR x bandwidth over local / voltage / prism into a performance map.

    Each point is timed at least --repeat times, then until its median's 95 % confidence interval is
    within --target-ci of it, at most --max-repeat times or --point-budget seconds; the chains of one
    batch size are timed interleaved. Resumable: points already in --out are skipped, and the map is
    written after every point.
    Ctrl-C or SIGTERM stops after the point in progress (a second Ctrl-C at once), keeps every
    point measured and exits 130 / 143; run the same command again to resume.
    """
    from ..engines.manifest import Manifest
    from ..profiler.calibration import calibrate
    from ..profiler.sweep import SEED_BUDGET_PASSES, Launcher, StopSignals, SweepInterrupted, SweepPlan
    from ..profiler.sweep import profile as run_profile

    batch_list, rates, cr_list = list(batches), list(bandwidths), list(crs) or None
    progress = show_progress()
    world = Manifest.read(engines / "rank0").world_size
    plan = SweepPlan.for_build(engines, batch_list, cr_list, rates or [None],
                               warmup, repeat, _rule(repeat, max_repeat, target_ci, point_budget))
    say = functools.partial(click.echo, err=as_json)  # with --json, stdout holds the JSON alone
    say(f"{world} ranks, {len(batch_list)} batches x {len(plan.prism)} CRs "
               f"({', '.join(k.label for k in plan.prism)}) x {len(plan.bandwidths)} bandwidths: "
               f"{plan.total_passes()} to {plan.total_passes(most=True)} inference passes "
               f"(the Prism-on-Jetson paper's budget: about {SEED_BUDGET_PASSES})")
    testbed = None
    # One handler from here on: a signal during the testbed's set-up or the calibration must
    # still take the testbed down, and one during the sweep is handled by the sweep.
    with StopSignals() as stop:
        try:
            launcher = Launcher(world)
            if rates:
                from ..profiler.testbed import Testbed

                testbed = Testbed(world, f"{rates[0]:g}mbit", cpus_per_rank=threads)
                testbed.up()
                launcher = Launcher.on_testbed(testbed)
            if progress:
                say("calibrating agreement of each plan with the local model ...")
            accuracy = calibrate(engines, calib_data, calib_samples)
            data = run_profile(engines, out, plan, launcher, threads, timeout_s, energy, progress=progress,
                               accuracy=accuracy, stop=stop)
        except SweepInterrupted as interrupted:
            # Click would print it as "Error: ..."; being stopped on request is not an error.
            with stop.mode("shield"):
                click.echo(str(interrupted) if interrupted.detail else
                           f"{interrupted} before the sweep started; run the same command again to start it",
                           err=True)
            raise click.exceptions.Exit(interrupted.exit_code) from None
        finally:
            with stop.mode("shield"):
                if testbed is not None:
                    testbed.down()
    meter = data.metadata["energy_meter"]
    if as_json:
        click.echo(json.dumps({"points": len(data.points), "map": str(out), "energy_meter": meter}, indent=2))
        return
    click.echo(f"{len(data.points)} points in {out}; energy meter: {meter or 'n/a'}")


@main.command("sweep-rank0", hidden=True)
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="The build directory (with rank0/ .. rankN/).")
@group_options
@click.option("--threads", type=click.IntRange(min=1), default=1, help="Threads (cores) of this rank.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, help="Untimed runs before each point's timed runs.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, help="The least timed runs per point.")
@sampling_options
@click.option("--points", required=True, help="JSON list of [chain key, batch].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON-lines file to append results to.")
@click.option("--energy", default=None, help="jtop, nvml or rapl (default: the first that works).")
def sweep_rank0(engines, group, threads, warmup, repeat, max_repeat, target_ci, point_budget, points, out, energy):
    """Rank 0 of a profile sweep (started by `prism-trt profile`, not by hand).

    SIGTERM or SIGINT: finish the point in progress, tell the workers to stop, exit 128 + signal."""
    import signal
    import threading

    # Before the heavy imports and the join, so a signal during them is not lost (nor a traceback).
    stop, received = threading.Event(), []

    def request_stop(signum, frame) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    import faulthandler

    # The driver sends SIGUSR1 when this rank measured everything but does not exit: every thread's
    # stack then lands in this rank's log.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from ..core.chain_key import ChainKey
    from ..profiler.rank0 import measure_points

    todo = [(ChainKey.from_dict(key), int(batch)) for key, batch in json.loads(points)]
    rule = _rule(repeat, max_repeat, target_ci, point_budget)
    done = measure_points(engines, group, todo, out, threads, warmup, rule, energy, stop)
    if received:
        click.echo(f"rank 0: {signal.Signals(received[0]).name}, stopped after {done} of {len(todo)} points", err=True)
        raise click.exceptions.Exit(128 + received[0])


@main.command()
@click.option("--map", "map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
              help="Performance map JSON (from `prism-trt profile`).")
@click.option("--batch", "-B", type=click.IntRange(min=1), required=True, help="The batch size to choose for.")
@click.option("--bandwidth", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Measured bandwidth in Mbit/s (omit for loopback).")
@click.option("--objective", type=click.Choice(["latency", "energy"]), default="latency", show_default=True,
              help="What the choice minimises per sample.")
@click.option("--min-agreement", type=FiniteFloat(0, 1), default=0.99, show_default=True,
              help="Never pick a CR whose agreement with the local model is lower (0: latency only, as the paper).")
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Refuse a map measured with other engines than these.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def select(map_path, batch, bandwidth, objective, min_agreement, engines, as_json):
    """Choose local / voltage / prism (and the CR) for a batch, and say why."""
    from ..engines.perfmap import PerfMap
    from ..profiler.adaptive import MapSelector

    data = PerfMap.load(map_path, engines_dir=engines)
    decision = MapSelector(data, objective, min_agreement).decide(batch, bandwidth)
    if as_json:
        click.echo(json.dumps(_decision_record(decision), indent=2))
        return
    click.echo(decision.explain())


def _decision_record(decision) -> dict:
    """`select --json`: the choice and every candidate with its figures and why it lost."""
    def candidate(c) -> dict:
        return {"choice": c.choice.to_dict(), "label": c.choice.label, "per_sample_ms": c.per_sample_ms,
                "energy_per_sample_j": c.energy_per_sample_j, "source": c.source, "rejected": c.rejected or None}

    return {"choice": decision.choice.to_dict(), "label": decision.choice.label, "objective": decision.objective,
            "best": candidate(decision.best), "candidates": [candidate(c) for c in decision.candidates]}


@main.group()
def model():
    """The latency model fitted from a performance map."""


@model.command("fit")
@click.argument("map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--test", "test_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Also fit on the whole map and report on this one (e.g. a later sweep of the same engines).")
@click.option("--compute-from", "transfer_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Also report the transfer to another architecture's map: link, staging, skew and "
                                 "other terms fitted here, compute re-fitted on that map, its distributed points "
                                 "predicted.")
@click.option("--local-compute", is_flag=True,
              help="With --compute-from: re-fit compute on that map's local points only.")
@click.option("--request-bytes", type=(FiniteFloat(min=0), FiniteFloat(min=0)), default=(None, None),
              help="Request bytes per sample of this map's model and of --compute-from's (e.g. 602112 for "
                   "3x224x224 float32): the request's buffered tail is then a known wait at the first barrier. "
                   "Left out, that wait is fitted and both requests are taken to be the same size.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def model_fit(map_path, test_path, transfer_path, local_compute, request_bytes, as_json):
    """Fit the model and report its MAPE on held-out points (leave-one-out, each batch size held
    out, each bandwidth held out) per term and for the total, next to a naive baseline (goal: total
    <= 4 %). "error share" is a term's mean absolute error as a share of the mean total latency."""
    from ..engines.perfmap import PerfMap
    from ..profiler.adaptive import evaluate
    from ..profiler.adaptive.evaluation import compute_drift, cross_report, sampling_summary, transfer_report
    from ..report import format_table

    data = PerfMap.load(map_path)
    here = request_bytes[0]
    report = evaluate(data.points, here)
    noise, drift = sampling_summary(data.points), compute_drift(data.points)
    if test_path is not None:
        report[f"fitted here, tested on {test_path.name}"] = cross_report(data.points, PerfMap.load(test_path).points,
                                                                          here)
    if transfer_path is not None:
        which = "local" if local_compute else "every rank's"
        report[f"fitted here, {which} compute from {transfer_path.name}, tested on its distributed points"] = \
            transfer_report(data.points, PerfMap.load(transfer_path).points, local_compute, request_bytes)
    if as_json:
        click.echo(json.dumps({**report, "sampling": noise, "compute_drift_percent": drift}, indent=2))
        return
    if noise:
        click.echo(f"{len(data.points)} points, {noise['points']} sampled to a CI: {noise['samples_min']}-"
                   f"{noise['samples_max']} samples (median {noise['samples_median']}), stopped {noise['stopped']}, "
                   f"{noise['outliers_kept']} outliers kept; median CI half-width "
                   f"{noise['median_ci_rel_percent']:.1f} % "
                   f"(max {noise['max_median_ci_rel_percent']:.1f} %), standard error of the mean "
                   f"{noise['mean_rel_stderr_percent']:.1f} % (the noise floor of the total's MAPE)")
    if drift is not None:
        click.echo(f"compute of one chain and batch, measured again at each link rate: {drift:.1f} % apart (median "
                   "coefficient of variation: the board's drift over the sweep)")
    for scheme, terms in report.items():
        click.echo(f"\n{scheme}:")
        click.echo(format_table(["term", "MAPE %", "error share %", "points"],
                                [[term, v["mape_percent"], v["error_share_percent"], v["points"]]
                                 for term, v in terms.items()]))


@main.command()
@click.argument("map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory the PNG files are written to (created if missing).")
@click.option("--min-agreement", type=FiniteFloat(0, 1), default=0.99, show_default=True,
              help="The decision map never picks a CR whose agreement with the local model is lower.")
@click.option("--json", "as_json", is_flag=True, help="Print the written files as a JSON list.")
def plot(map_path, out, min_agreement, as_json):
    """Breakdown, per-sample, bandwidth and decision-map PNGs from a performance map."""
    from ..engines.perfmap import PerfMap
    from ..profiler.adaptive import MapSelector
    from ..profiler.adaptive.plots import plot_all

    data = PerfMap.load(map_path)
    written = plot_all(data, out, MapSelector(data, "latency", min_agreement))
    if as_json:
        click.echo(json.dumps([str(path) for path in written], indent=2))
        return
    for path in written:
        click.echo(str(path))

