"""The ``prism-trt`` command line: each subcommand is a thin layer over public functions."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from . import __version__


def model_options(func):
    """--model / --checkpoint, shared by every command that needs a model."""
    @click.option("--model", "model_name", metavar="NAME",
                  help="timm ViT name, random init (e.g. vit_tiny_patch16_224, deit_small_patch16_224).")
    @click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                  help="Checkpoint in the bundled MNIST ViT format (e.g. ../shared/data/mnist/vit_mnist.pt).")
    @functools.wraps(func)
    def wrapper(*args, model_name, checkpoint, **kwargs):
        if (model_name is None) == (checkpoint is None):
            raise click.UsageError("give exactly one of --model NAME or --checkpoint PATH")
        return func(*args, model_name=model_name, checkpoint=checkpoint, **kwargs)
    return wrapper


def plan_options(func):
    """--ranks / --cr / --segments / --weights, shared by commands that take a partition."""
    @click.option("--ranks", "-P", type=click.IntRange(min=1), default=2, show_default=True, help="Number of ranks (boards).")
    @click.option("--cr", "crs", type=float, multiple=True,
                  help="Compression rate ceil(N/P)/L; repeat for several (e.g. --cr 9.9 --cr 4.95).")
    @click.option("--segments", "-L", "segments", type=click.IntRange(min=1), multiple=True,
                  help="Segments per partition L instead of a CR; repeatable.")
    @click.option("--weights", type=str, default=None,
                  help="Comma-separated relative speed per rank for uneven partitions (e.g. 2,1).")
    @functools.wraps(func)
    def wrapper(*args, weights, **kwargs):
        parsed = None
        if weights is not None:
            try:
                parsed = [float(w) for w in weights.split(",")]
            except ValueError:
                raise click.BadParameter(f"expected comma-separated numbers, got {weights!r}", param_hint="--weights") from None
        return func(*args, weights=parsed, **kwargs)
    return wrapper


def _spec(model_name: str | None, checkpoint: Path | None):
    from .model import load_model, timm_spec

    if model_name is not None:
        return timm_spec(model_name)
    return load_model(checkpoint=checkpoint).spec


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prism-trt")
def main() -> None:
    """Distributed ViT inference on edge boards with Prism segment means.

    \b
    Typical flow:
      prism-trt info      --model vit_base_patch16_224
      prism-trt flops     --model vit_base_patch16_224 --ranks 2 --cr 9.9 --cr 4.95 --cr 3.3
      prism-trt accuracy  --checkpoint ../shared/data/mnist/vit_mnist.pt --ranks 2 --segments 5
    """


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
def info(model_name, checkpoint, as_json):
    """Show a model's ViTSpec: tokens, widths, heads, pooling."""
    from .model import CheckpointMismatchError, UnsupportedModelError

    try:
        spec = _spec(model_name, checkpoint)
    except (ValueError, FileNotFoundError, UnsupportedModelError, CheckpointMismatchError) as error:
        _fail(error)
    if as_json:
        click.echo(json.dumps(spec.to_dict(), indent=2))
        return
    for key, value in spec.to_dict().items():
        click.echo(f"{key:>18}: {value}")
    click.echo(f"{'tokens (N)':>18}: {spec.num_tokens} ({spec.num_prefix_tokens} prefix + {spec.num_patches} patches)")
    click.echo(f"{'attention width':>18}: {spec.attn_dim} (H*d_h)")


@main.command()
@model_options
@plan_options
@click.option("--batch", "-B", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size for the byte counts.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Element type of the exchanged features.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (local, voltage, prism[...]).")
def flops(model_name, checkpoint, ranks, crs, segments, weights, batch, dtype, as_json):
    """GFLOPs per device and bytes exchanged per block: local vs Voltage vs Prism.

    Reproduces seed 000 Table 3 with
    `prism-trt flops --model vit_base_patch16_224 --ranks 2 --cr 9.9 --cr 4.95 --cr 3.3`.
    """
    from .core import PlanError
    from .core.accounting import flops_report
    from .report import format_table

    try:
        spec = _spec(model_name, checkpoint)
        report = flops_report(spec, ranks, list(crs), list(segments), batch, 2 if dtype == "fp16" else 4, weights)
    except (PlanError, ValueError, FileNotFoundError) as error:
        _fail(error)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    local_gflops = report["local"]["gflops_per_device"]
    rows = []
    for entry in [report["local"], report["voltage"], *report["prism"]]:
        speedup = None if entry["strategy"] == "local" else 1 - entry["gflops_per_device"] / local_gflops
        reduction = entry["comm_reduction"] if entry["strategy"] == "prism" else None
        rows.append([entry["strategy"], entry["ranks"], entry["cr"], entry["segments"], entry["gflops_per_device"],
                     None if speedup is None else f"{100 * speedup:.2f}%",
                     None if reduction is None else f"{100 * reduction:.1f}%",
                     "/".join(str(b) for b in entry["bytes_per_block_per_rank"]) or None])
    click.echo(f"{spec.name}: N={spec.num_tokens} tokens, partition {report['partition']}, batch {batch}, {dtype}")
    click.echo(format_table(["strategy", "P", "CR", "L", "GFLOPs/dev", "compute saved", "comm reduction",
                             "bytes/block/rank"], rows))


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint in the bundled MNIST ViT format.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                   "[default: $PRISM_TRT_DATA/mnist or ../shared/data/mnist].")
@plan_options
@click.option("--means-source", type=click.Choice(["ln1", "input", "both"]), default="ln1", show_default=True,
              help="Average LN1(x) (exact keys/values of the mean) or the block input x.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N test images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def accuracy(checkpoint, data, ranks, crs, segments, weights, means_source, limit, batch_size, threads, as_json):
    """MNIST test accuracy of Prism plans, and agreement with the unpartitioned model.

    Without --cr/--segments the plan is CR=1 (Voltage), which must equal the unpartitioned model.
    """
    import torch

    from .core import PlanError, make_partition_plan, make_segment_plan, voltage_plan
    from .core.accuracy import evaluate
    from .data import MnistTestSet, data_dir
    from .model import CheckpointMismatchError, load_model
    from .report import format_table

    if threads:
        torch.set_num_threads(threads)
    try:
        model = load_model(checkpoint=checkpoint)
        spec = model.spec
        partition = make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, ranks, weights)
        plans = [make_segment_plan(partition, cr=cr) for cr in crs]
        plans += [make_segment_plan(partition, segments=L) for L in segments]
        plans = plans or [voltage_plan(partition)]
        dataset = MnistTestSet(data or data_dir() / "mnist", spec.mean[0], spec.std[0], limit)
    except (PlanError, CheckpointMismatchError, FileNotFoundError, ValueError) as error:
        _fail(error)
    sources = ["ln1", "input"] if means_source == "both" else [means_source]
    results = evaluate(model, dataset.batches(batch_size), plans, sources, total=len(dataset),
                       progress=sys.stderr.isatty() or not as_json)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    click.echo(f"unpartitioned: {results[0].reference_correct}/{results[0].total}")
    click.echo(format_table(
        ["P", "L", "CR", "means", "correct/total", "accuracy", "agreement"],
        [[r.ranks, r.segments, r.cr, r.means_source, f"{r.correct}/{r.total}", f"{100 * r.accuracy:.2f}%",
          f"{100 * r.agreement:.2f}%"] for r in results]))


def _model_source(model_name, checkpoint) -> dict:
    from .engines.manifest import sha256_file

    if model_name is not None:
        return {"timm": model_name, "pretrained": False}
    return {"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint)}


@main.command()
@model_options
@plan_options
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Engine backend: onnxruntime (x86, fallback) or native TensorRT (boards with an NVIDIA GPU).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider the engines are prepared for.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory; gets one rankN/ directory per board.")
@click.option("--means-source", type=click.Choice(["ln1", "input"]), default="ln1", show_default=True)
@click.option("--fp16", is_flag=True, help="Reduced-precision engines (TensorRT / TensorRT EP).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="ONNX exporter; torchscript is much faster, dynamo gives leaner graphs.")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workspace-mib", type=click.IntRange(min=16), default=1024, show_default=True,
              help="TensorRT workspace memory pool limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--no-voltage", is_flag=True, help="Skip the CR=1 (Voltage) chains.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-vs-reference check of every stage.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def build(model_name, checkpoint, ranks, crs, segments, weights, backend, provider, out_dir, means_source, fp16,
          exporter, min_batch, opt_batch, max_batch, workspace_mib, opt_level, no_voltage, no_verify, threads, quiet):
    """Export per-block ONNX stages for every rank, verify them and compile engines.

    Writes OUT/rankN/ for each of the P ranks (copy each to its board) with a manifest.json that
    records the model, plans, stages, backend, device and the SHA-256 of every file. Without
    --cr/--segments, CRs 9.9, 4.95 and 3.3 are built; rank 0 always gets the local (P=1) chain.
    Unchanged stages are not rebuilt.
    """
    from .core import PlanError
    from .engines import BackendUnavailable, BuildOptions, get_backend
    from .export.build import Builder, config_plans
    from .model import CheckpointMismatchError, UnsupportedModelError, load_model
    from .report import format_table

    if not crs and not segments:
        crs = (9.9, 4.95, 3.3)
    try:
        options = BuildOptions(fp16=fp16, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                               workspace_mib=workspace_mib, optimization_level=opt_level,
                               timing_cache=str(out_dir / "timing.cache"))
        engine_backend = get_backend(backend, provider, threads)
        model = load_model(model_name, checkpoint)
        spec = model.spec
        configs = config_plans(spec.num_tokens, spec.num_prefix_tokens, ranks, list(crs), list(segments), weights,
                               include_voltage=not no_voltage)
        builder = Builder(model, _model_source(model_name, checkpoint), engine_backend, options, means_source,
                          exporter, verify=not no_verify)
        result = builder.build(out_dir, ranks, configs, progress=not quiet)
    except (PlanError, ValueError, FileNotFoundError, BackendUnavailable, CheckpointMismatchError,
            UnsupportedModelError, RuntimeError) as error:
        _fail(error)
    groups: dict = {}
    for stage in result.stages:
        groups.setdefault((stage.rank, stage.config), []).append(stage)
    rows = []
    for (rank, config), stages in groups.items():
        diffs = [s.max_abs_diff for s in stages if s.max_abs_diff is not None]
        rows.append([f"rank{rank}", config, len(stages), sum(s.exported for s in stages),
                     sum(s.built for s in stages), f"{max(diffs):.1e}" if diffs else None,
                     f"{sum(s.bytes for s in stages) / 2**20:.1f}"])
    click.echo(format_table(["rank", "config", "stages", "exported", "built", "max |diff|", "MiB"], rows))
    click.echo(f"{backend} ({engine_backend.device()}) engines for {spec.name} in {out_dir} "
               f"({result.seconds:.1f} s; unchanged stages reused)")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--no-verify", is_flag=True, help="Do not hash the files.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest(s) as JSON.")
def inspect(directory, no_verify, as_json):
    """Show an engine directory (a build's OUT or one rankN/) and verify its file hashes."""
    from .engines.manifest import ManifestError, load_manifest
    from .report import format_table

    rank_dirs = sorted(p for p in directory.glob("rank*") if p.is_dir()) if (directory / "build.json").is_file() \
        else [directory]
    manifests = []
    try:
        for rank_dir in rank_dirs:
            manifests.append((rank_dir, load_manifest(rank_dir, verify=not no_verify)))
    except ManifestError as error:
        _fail(error)
    if as_json:
        click.echo(json.dumps([m for _, m in manifests], indent=2))
        return
    for rank_dir, manifest in manifests:
        spec, backend = manifest["model"]["spec"], manifest["backend"]
        click.echo(f"{rank_dir}: rank {manifest['rank']} of {manifest['world_size']}, model {spec['name']} "
                   f"(weights {manifest['model']['weights_sha256'][:12]}), means {manifest['means_source']}")
        click.echo(f"  backend {backend['name']} {backend['version']} on {backend['device']}, "
                   f"exporter {manifest['export']['exporter']} (torch {manifest['export']['torch']}), "
                   f"options {manifest['build_options']}")
        rows = []
        for config in manifest["configs"]:
            diffs = [s["max_abs_diff"] for s in config["stages"] if s["max_abs_diff"] is not None]
            rows.append([config["name"], config["mode"], config["ranks"], config["cr"], config["segments"],
                         "/".join(map(str, config["counts"])), len(config["stages"]),
                         f"{max(diffs):.1e}" if diffs else None])
        click.echo("  " + format_table(["config", "mode", "P", "CR", "L", "sent/rank", "stages", "max |diff|"],
                                       rows).replace("\n", "\n  "))
        state = "not verified" if no_verify else "SHA-256 verified"
        click.echo(f"  {len(manifest['files'])} files, {state}")


def group_options(func):
    """Process-group flags, shared by `run` and `serve`; torchrun's environment fills the gaps."""
    @click.option("--rank", type=click.IntRange(min=0), default=None, help="This board's rank [env RANK].")
    @click.option("--world-size", type=click.IntRange(min=1), default=None, help="Number of boards [env WORLD_SIZE].")
    @click.option("--master-addr", default=None, help="Rank 0's address [env MASTER_ADDR, default 127.0.0.1].")
    @click.option("--master-port", type=click.IntRange(1, 65535), default=None,
                  help="Rank 0's rendezvous port [env MASTER_PORT, default 29500].")
    @click.option("--iface", default=None, help="Network interface for GLOO [env GLOO_SOCKET_IFNAME].")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
                  help="Seconds before a collective (or joining the group) fails.")
    @functools.wraps(func)
    def wrapper(*args, rank, world_size, master_addr, master_port, iface, timeout_s, **kwargs):
        from .runtime.group import GroupConfig

        if rank is None and world_size is None and "RANK" not in os.environ:
            rank, world_size = 0, 1  # a single board
        try:
            group = GroupConfig.from_env_or_flags(rank, world_size, master_addr, master_port, timeout_s, iface)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        return func(*args, group=group, **kwargs)
    return wrapper


def _rank_dir(engines: Path, rank: int) -> Path:
    candidate = engines / f"rank{rank}"
    return candidate if candidate.is_dir() else engines


def _choice(mode: str, cr: float | None):
    from .runtime.api import Choice

    try:
        return Choice(mode, cr)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def _breakdown_table(result: dict) -> str:
    from .report import format_table

    rows = []
    for rank, times in enumerate(result["per_rank"]):
        total = times["total"] or 1.0
        row = [f"rank{rank}"]
        for phase in ("compute", "d2h", "h2d", "wait", "comm", "other"):
            value = times[phase]
            row.append(None if value is None else f"{value:.2f} ({100 * value / total:.0f}%)")
        rows.append(row + [f"{times['total']:.2f}", int(times["bytes_sent"]), int(times["bytes_received"])])
    return format_table(["rank", "compute ms", "D2H ms", "H2D ms", "wait ms", "comm ms", "other ms", "total ms",
                         "sent B", "recv B"], rows)


@main.command()
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A build directory (rankN/ is picked by rank) or one rank's engine directory.")
@group_options
@click.option("--mode", type=click.Choice(["local", "voltage", "prism"]), default="prism", show_default=True)
@click.option("--cr", type=float, default=None, help="Compression rate for prism mode (one that was built).")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--profile-barrier", is_flag=True,
              help="Barrier before every collective: splits comm into wait (rank skew) and transfer.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Engine intra-op threads.")
@click.option("--device", default="cpu", show_default=True, help="Where engine tensors live (cpu, cuda:0).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result as JSON here (rank 0).")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a torch profiler Chrome trace of the timed runs (rank 0).")
def run(engines, group, mode, cr, batch, repeat, warmup, profile_barrier, threads, device, json_out, trace):
    """Time inferences and print the per-rank breakdown (compute / staging / comm / other).

    Start the same command on every board with its --rank (or under torchrun); rank 0 drives and
    prints, the others follow until rank 0 is done. Example for two ranks on one host:

    \b
      prism-trt run --engines engines/ --rank 1 --world-size 2 &
      prism-trt run --engines engines/ --rank 0 --world-size 2 --mode prism --cr 9.9 --batch 8
    """
    import logging

    from .engines.manifest import ManifestError
    from .runtime.distributed import DistributedExecutor, run_worker
    from .runtime.local import LocalExecutor
    from .runtime.measure import measure

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank_dir = _rank_dir(engines, group.rank)
    choice = _choice(mode, cr) if group.rank == 0 else None  # workers follow rank 0's choices
    try:
        if group.rank != 0:
            batches = run_worker(rank_dir, group, threads, device)
            click.echo(f"rank {group.rank}: ran {batches} batches, stopped by rank 0")
            return
        if group.world_size == 1:
            if mode != "local":
                raise click.UsageError(f"{mode} mode needs --world-size >= 2 (one process per rank)")
            executor = LocalExecutor(rank_dir, threads)
        else:
            executor = DistributedExecutor(rank_dir, group, threads, device, profile_barrier)
        try:
            result = measure(executor, choice, batch, warmup, repeat, trace=trace)
        finally:
            executor.close()
    except (ManifestError, ValueError, RuntimeError) as error:
        _fail(error)
    latency = result["latency"]
    click.echo(f"{executor.model_name} {choice.label} batch {batch}: mean {latency['mean_ms']:.2f} ms "
               f"(p50 {latency['p50_ms']:.2f}, p90 {latency['p90_ms']:.2f}, sd {latency['stdev_ms']:.2f}), "
               f"{latency['per_sample_ms']:.2f} ms/sample over {repeat} runs"
               + (" -- FELL BACK to local" if result["fell_back"] else ""))
    click.echo(_breakdown_table(result))
    wait_note = "comm is transfer only; wait = skew at the barrier" if profile_barrier else \
        "comm includes waiting for the slowest rank (use --profile-barrier to split it)"
    click.echo(f"({wait_note}; staging = D2H + H2D copies around each all-gather)")
    if json_out:
        from .engines.manifest import write_json_atomic

        write_json_atomic(json_out, result)
    if trace:
        click.echo(f"trace written to {trace} (open in chrome://tracing or ui.perfetto.dev)")


def _numbers(text: str | None, cast, name: str) -> list:
    if not text:
        return []
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


@main.command()
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="The build directory (with rank0/ .. rankN/).")
@click.option("--batch", "batches", default="1,2,4,8,16,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--cr", "crs", default=None, help="Compression rates to profile [default: every prism CR built].")
@click.option("--bandwidth", "bandwidths", default=None,
              help="Link rates in Mbit/s, e.g. 200,340,500,700,900: runs the ranks in a tc-shaped testbed "
                   "(needs root). Without it, ranks talk over unshaped loopback.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Performance map JSON.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Threads (cores) per rank.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=60.0, show_default=True)
@click.option("--calib-data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Calibration images for the agreement of each CR [default: MNIST test set for the bundled "
                   "checkpoint, random inputs for random-weight models].")
@click.option("--calib-samples", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--energy", type=click.Choice(["jtop", "nvml", "rapl"]), default=None,
              help="Energy meter [default: the first that works here; none -> energy is n/a].")
@click.option("--quiet", "-q", is_flag=True)
def profile(engines, batches, crs, bandwidths, warmup, repeat, out, threads, timeout_s, calib_data, calib_samples,
            energy, quiet):
    """Sweep batch x CR x bandwidth over local / voltage / prism into a performance map.

    Resumable: points already in --out are skipped, and the map is written after every point.
    """
    from .engines.manifest import ManifestError, read_manifest
    from .profiler.calibration import calibrate
    from .profiler.perfmap import PerfMapError
    from .profiler.sweep import SEED_BUDGET_PASSES, Launcher, SweepPlan
    from .profiler.sweep import profile as run_profile

    batch_list, rates = _numbers(batches, int, "--batch"), _numbers(bandwidths, float, "--bandwidth")
    try:
        manifest = read_manifest(engines / "rank0")
    except ManifestError as error:
        _fail(error)
    built = [c["cr"] for c in manifest["configs"] if c["mode"] == "prism"]
    cr_list = _numbers(crs, float, "--cr") or built
    world = manifest["world_size"]
    plan = SweepPlan(batch_list, cr_list, rates or [None], warmup, repeat)
    passes = plan.total_passes()
    click.echo(f"{world} ranks, {len(batch_list)} batches x {len(cr_list)} CRs x {len(plan.bandwidths)} bandwidths: "
               f"{passes} inference passes (seed 000 budget: about {SEED_BUDGET_PASSES})")
    testbed = None
    try:
        launcher = Launcher(world)
        if rates:
            from .profiler.testbed import Testbed

            testbed = Testbed(world, f"{rates[0]:g}mbit", cpus_per_rank=threads)
            testbed.up()

            def set_rate(rate: float) -> float | None:
                testbed.set_bandwidth(f"{rate:g}mbit")
                return testbed.measure_bandwidth(1, 0)

            launcher = Launcher(world, testbed.address(0), None, testbed.command, set_rate)
        if not quiet:
            click.echo("calibrating agreement of each plan with the local model ...")
        accuracy = calibrate(engines, calib_data, calib_samples)
        data = run_profile(engines, out, plan, launcher, threads, timeout_s, energy, progress=not quiet,
                           accuracy=accuracy)
    except (PerfMapError, ManifestError, RuntimeError, ValueError, OSError) as error:
        _fail(error)
    finally:
        if testbed is not None:
            testbed.down()
    click.echo(f"{len(data['points'])} points in {out}; energy meter: {data['metadata']['energy_meter'] or 'n/a'}")


@main.command()
@click.option("--map", "map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True)
@click.option("--batch", "-B", type=click.IntRange(min=1), required=True)
@click.option("--bandwidth", type=float, default=None, help="Measured bandwidth in Mbit/s (omit for loopback).")
@click.option("--objective", type=click.Choice(["latency", "energy"]), default="latency", show_default=True)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="Never pick a CR whose agreement with the local model is lower (0: latency only, as the paper).")
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Refuse a map measured with other engines than these.")
def select(map_path, batch, bandwidth, objective, min_agreement, engines):
    """Choose local / voltage / prism (and the CR) for a batch, and say why."""
    from .profiler import perfmap
    from .profiler.selector import MapSelector

    try:
        data = perfmap.load(map_path, engines_dir=engines)
        decision = MapSelector(data, objective, min_agreement).decide(batch, bandwidth)
    except (perfmap.PerfMapError, ValueError, KeyError) as error:
        _fail(error)
    click.echo(decision.explain())


@main.group()
def model():
    """The latency model fitted from a performance map."""


@model.command("fit")
@click.argument("map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def model_fit(map_path, as_json):
    """Fit the model and report leave-one-out MAPE per term and for the total (goal <= 4 %)."""
    from .profiler import perfmap
    from .profiler.latency_model import leave_one_out, naive_total_mape
    from .report import format_table

    try:
        data = perfmap.load(map_path)
    except perfmap.PerfMapError as error:
        _fail(error)
    report = leave_one_out(data["points"])
    report["naive_total"] = {"mape_percent": naive_total_mape(data["points"]), "points": len(data["points"])}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(format_table(["term", "LOO MAPE %", "points"],
                            [[term, v["mape_percent"], v["points"]] for term, v in report.items()]))


@main.command()
@click.argument("map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True)
def plot(map_path, out, min_agreement):
    """Breakdown, per-sample, bandwidth and decision-map PNGs from a performance map."""
    from .profiler import perfmap
    from .profiler.plots import plot_all
    from .profiler.selector import MapSelector

    try:
        data = perfmap.load(map_path)
        selector = MapSelector(data, "latency", min_agreement)
        written = plot_all(data, out, selector)
    except (perfmap.PerfMapError, ValueError) as error:
        _fail(error)
    for path in written:
        click.echo(str(path))


class _Stopped(Exception):
    """SIGTERM reached rank 0's server."""


@main.command()
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A build directory (rankN/ is picked by rank) or one rank's engine directory.")
@group_options
@click.option("--mode", type=click.Choice(["local", "voltage", "prism", "auto"]), default="local", show_default=True,
              help="How batches run; auto chooses per batch from a performance map (--map).")
@click.option("--cr", type=float, default=None, help="Compression rate for --mode prism.")
@click.option("--map", "map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Performance map for --mode auto (from `prism-trt profile`).")
@click.option("--objective", type=click.Choice(["latency", "energy"]), default="latency", show_default=True)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (rank 0); 0.0.0.0 exposes it.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--token", envvar="PRISM_TRT_TOKEN", default=None,
              help="Require `Authorization: Bearer TOKEN` [env PRISM_TRT_TOKEN].")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a batch waits for more requests.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Engine intra-op threads.")
@click.option("--device", default="cpu", show_default=True, help="Where engine tensors live (cpu, cuda:0).")
def serve(engines, group, mode, cr, map_path, objective, min_agreement, host, port, token, max_wait_ms, threads,
          device):
    """Serve classifications over the KServe v2 / Open Inference Protocol HTTP API.

    Run the same command on every board with its --rank (or under torchrun): rank 0 loads its
    engines, joins the group and serves HTTP; the other ranks follow rank 0. If a worker dies,
    rank 0 answers with its local chain and reports degraded readiness; restart all ranks to
    distribute again. Ctrl-C / SIGTERM on rank 0 stops every rank.
    """
    import logging
    import signal

    from .engines.manifest import ManifestError
    from .runtime.api import FixedSelector
    from .runtime.distributed import DistributedExecutor, run_worker
    from .runtime.local import LocalExecutor
    from .serve import create_app
    from .serve import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank_dir = _rank_dir(engines, group.rank)
    if group.rank != 0:
        def stop(signum, frame):
            raise SystemExit(f"rank {group.rank}: signal {signum}, leaving the group")

        signal.signal(signal.SIGTERM, stop)
        try:
            batches = run_worker(rank_dir, group, threads, device)
        except (ManifestError, ValueError, RuntimeError) as error:
            _fail(error)
        click.echo(f"rank {group.rank}: served {batches} batches, stopped by rank 0")
        return
    if mode == "auto" and map_path is None:
        raise click.UsageError("--mode auto needs --map PERFMAP.json (make one with `prism-trt profile`)")
    if mode in ("voltage", "prism") and group.world_size == 1:
        raise click.UsageError(f"{mode} mode needs --world-size >= 2")
    try:
        if group.world_size == 1:
            executor = LocalExecutor(rank_dir, threads)
        else:
            executor = DistributedExecutor(rank_dir, group, threads, device)
    except (ManifestError, ValueError, RuntimeError) as error:
        _fail(error)
    try:
        if mode == "auto":
            from .profiler import perfmap
            from .profiler.selector import LiveSelector, MapSelector

            data = perfmap.load(map_path, engines_dir=engines)
            selector = LiveSelector(MapSelector(data, objective, min_agreement), executor)
        else:
            selector = FixedSelector(_choice(mode, cr))
        app = create_app(executor, selector, token=token, max_wait_ms=max_wait_ms)
        click.echo(f"serving {executor.model_name} ({mode}) on http://{host}:{port}/v2/models/{executor.model_name}")

        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then restores the handlers it found and
        # re-raises the signal: with this handler in place that ends here, so the workers get stopped.
        def stopped(signum, frame):
            raise _Stopped(signum)

        signal.signal(signal.SIGTERM, stopped)
        run_server(app, host=host, port=port)
    except (_Stopped, KeyboardInterrupt):
        click.echo("rank 0: stopping every rank")
    except (ValueError, OSError) as error:
        _fail(error)
    finally:
        executor.close()


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("prism-demo"), show_default=True,
              help="Where engines, the performance map, plots and the summary go.")
@click.option("--quick", is_flag=True, help="Fewer batches and bandwidths (what CI runs).")
def demo(out, quick):
    """Run the whole pipeline here: build, testbed, profile, fit, plot, serve --mode auto, requests.

    Uses the shared MNIST ViT when ../shared/data/mnist (or PRISM_TRT_DATA) is present, else
    vit_tiny_patch16_224 with random weights. Network namespaces shape the links when run as
    root with ip/tc, else ranks use loopback. Everything is torn down at the end, on Ctrl-C or on
    failure.
    """
    from .demo import main_demo

    try:
        code = main_demo(out, quick)
    except (RuntimeError, ValueError, OSError) as error:
        _fail(error)
    sys.exit(code)


def _register_testbed() -> None:
    from .profiler.testbed_cli import testbed

    main.add_command(testbed)


_register_testbed()

if __name__ == "__main__":
    main()
