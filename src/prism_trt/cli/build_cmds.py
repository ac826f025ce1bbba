"""Engine commands: build, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import TextModelOptions, cr_mapping, is_text_model, main, model_options, plan_options, text_options
from .output import current_output, show_progress


def _model_source(model_name, checkpoint) -> dict:
    from ..engines.json_record import sha256_file

    if model_name is not None:
        return {"timm": model_name, "pretrained": False}
    return {"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint)}


def _load(model_name, checkpoint, text: TextModelOptions, text_model: bool):
    """The model and the source record of its build: a timm ViT, a checkpoint, or a text config."""
    if not text_model:
        if text.resized:
            raise click.UsageError("--layers, --hidden-size, --heads and --vocab-size apply to text models only")
        from ..model import load_model

        return load_model(model_name, checkpoint), _model_source(model_name, checkpoint)
    from ..model.text_adapters import load_text_model, size_overrides, text_source

    overrides = size_overrides(model_name, text.layers, text.hidden_size, text.heads, text.vocab_size)
    return load_text_model(model_name, **overrides), text_source(model_name, overrides)


@main.command()
@model_options
@plan_options
@text_options
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="Engine backend: onnxruntime (x86, fallback) or native TensorRT (boards with an NVIDIA GPU).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider the engines are prepared for.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory; gets one rankN/ directory per board.")
@click.option("--means-source", type=click.Choice(["ln1", "input"]), default="ln1", show_default=True,
              help="What the segment means average: LN1(x) (exact keys/values of the mean) or the block input x.")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "fp16"]), default=None,
              help="What the engines compute in; verification uses its tolerance. [default: the runtime's own: "
                   "fp32 on the CPU, tf32 on CUDA and TensorRT (Ampere+ GPUs such as Jetson Orin)]")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="ONNX exporter; auto is torchscript, ~40x faster to run than dynamo (torch >= 2.11), whose "
                   "leaner graphs onnxruntime optimises to the same size and speed.")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Smallest batch the engines accept.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batch TensorRT optimises for.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Largest batch the engines accept (run/serve refuse larger ones).")
@click.option("--workspace-mib", type=click.IntRange(min=16), default=1024, show_default=True,
              help="TensorRT workspace memory pool limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--no-voltage", is_flag=True, help="Skip the CR=1 (Voltage) chains.")
@click.option("--no-verify", is_flag=True, help="Skip the check of every engine (and ONNX file) against the torch "
                                                 "reference.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print every stage's report as JSON.")
def build(model_name, checkpoint, ranks, crs, segments, weights, text, backend, provider, out_dir, means_source,
          precision, exporter, min_batch, opt_batch, max_batch, workspace_mib, opt_level, no_voltage, no_verify,
          threads, as_json):
    """Export per-block ONNX stages for every rank, verify them and compile engines.

    Writes OUT/rankN/ for each of the P ranks (copy each to its board) with a manifest.json that
    records the model, plans, stages, backend, device, precision, verification reports and the
    SHA-256 of every file. Every engine is run where it will run and compared with the torch
    reference under its precision's tolerance (|err| <= atol + rtol*|ref|, scaled to the outputs);
    the table shows the share of the tolerance the worst element used. Without --cr/--segments,
    CRs 9.9, 4.95 and 3.3 are built (text models: one segment per rank, L = 1, the paper's BERT
    setting); rank 0 always gets the local (P=1) chain. Unchanged stages are not rebuilt.

    Text models (--model bert-base-uncased | gpt2 | ..., random init, shrunk with --layers,
    --hidden-size, --heads, --vocab-size) are built for a sequence length (--seq-len): requests
    bring INT64 input_ids and attention_mask, padded to it. Several lengths (--seq-len 32,128) are
    sequence buckets: one engine set each (rankN/seqM/ for the shorter ones), served together, a
    request running on the shortest that holds it; every bucket gets the same chains.
    """
    from ..engines import BuildOptions, get_backend
    from ..export.build import Builder, config_plans
    from ..report import format_table

    text_model = is_text_model(model_name)  # the one place the CLI asks: it picks the loader and the defaults
    if not crs and not segments:
        crs, segments = ((), (1,)) if text_model else ((9.9, 4.95, 3.3), ())
    engine_backend = get_backend(backend, provider, threads)
    options = BuildOptions(precision=engine_backend.resolve_precision(precision), min_batch=min_batch,
                           opt_batch=opt_batch, max_batch=max_batch, workspace_mib=workspace_mib,
                           optimization_level=opt_level, timing_cache=str(out_dir / "timing.cache"))
    model, source = _load(model_name, checkpoint, text, text_model)
    spec = model.spec
    lengths = text.seq_lens if text_model else (spec.num_tokens,)
    if lengths[-1] > getattr(spec, "max_positions", lengths[-1]):
        raise click.UsageError(f"--seq-len {lengths[-1]} exceeds {spec.name}'s {spec.max_positions} positions")
    _say_cr_mappings(crs, lengths, ranks)
    plans = {length: config_plans(length, spec.num_prefix_tokens, ranks, list(crs), list(segments), weights,
                                  include_voltage=not no_voltage) for length in lengths}
    builder = Builder(model, source, engine_backend, options, means_source, exporter, verify=not no_verify)
    result = builder.build(out_dir, ranks, plans.pop(lengths[-1]), progress=show_progress(), shorter=plans)
    if as_json:
        click.echo(json.dumps({"out": str(out_dir), "seconds": round(result.seconds, 2), "backend": backend,
                               "device": engine_backend.device(), "precision": options.precision,
                               "stages": [stage.to_dict() for stage in result.stages]}, indent=2))
        return
    groups: dict = {}
    for stage in result.stages:
        groups.setdefault((stage.rank, stage.config), []).append(stage)
    rows = []
    for (rank, config), stages in groups.items():
        errors = [s.max_abs_error for s in stages if s.max_abs_error is not None]
        used = [s.tolerance_used for s in stages if s.tolerance_used is not None]
        rows.append([f"rank{rank}", config, len(stages), sum(s.exported for s in stages),
                     sum(s.built for s in stages), f"{max(errors):.1e}" if errors else None,
                     _percent(max(used)) if used else None, f"{sum(s.bytes for s in stages) / 2**20:.1f}"])
    click.echo(format_table(["rank", "config", "stages", "exported", "built", "max |err|", "tol. used", "MiB"], rows))
    click.echo(f"{backend} ({engine_backend.device()}, {options.precision}) engines for {spec.name} in {out_dir} "
               f"({result.seconds:.1f} s; unchanged stages reused). tol. used: the largest share of the "
               f"{options.precision} tolerance any output element needed (100 % fails).")


def _say_cr_mappings(crs, lengths, ranks) -> None:
    """What each --cr becomes where L rounds it (on stderr: the result is the table or the JSON)."""
    from ..core.chain_key import ChainKey

    if ranks == 1 or current_output().quiet:
        return
    for length in lengths:
        seen: dict = {}
        for cr in crs:
            line = cr_mapping(cr, ChainKey.for_cr(cr, length, ranks), seen)
            if line is not None:
                click.echo(line + (f" at --seq-len {length}" if len(lengths) > 1 else ""), err=True)


def _percent(share: float) -> str:
    return f"{100 * share:.2g} %"


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--no-verify", is_flag=True, help="Do not hash the files.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest(s) as JSON.")
def inspect(directory, no_verify, as_json):
    """Show an engine directory (a build's OUT or one rankN/) and verify its file hashes."""
    from ..engines.manifest import Manifest
    from ..report import format_table

    rank_dirs = sorted(p for p in directory.glob("rank*") if p.is_dir()) if (directory / "build.json").is_file() \
        else [directory]
    manifests = [(rank_dir, Manifest.load(rank_dir, verify=not no_verify)) for rank_dir in rank_dirs]
    if as_json:
        click.echo(json.dumps([m.to_dict() for _, m in manifests], indent=2))
        return
    for rank_dir, manifest in manifests:
        spec, backend, options, export = manifest.spec, manifest.backend, manifest.build_options, manifest.export
        click.echo(f"{rank_dir}: rank {manifest.rank} of {manifest.world_size}, model {spec.name} "
                   f"(weights {manifest.model.weights_sha256[:12]}), means {manifest.means_source}")
        click.echo(f"  backend {backend.name} {backend.version} on {backend.device}, precision "
                   f"{options.precision}, exporter {export['exporter']} (torch {export['torch']}, ONNX opset "
                   f"{export['opset']}, IR {export['ir_version']}), batch {options.min_batch}/{options.opt_batch}/"
                   f"{options.max_batch}")
        rows = []
        for config in manifest.configs:
            checks = [s.verification.engine for s in config.stages if s.verification]
            errors = [check.max_abs_error for check in checks]
            plan = config.plan_dict()  # as recorded: a local chain has no CR or L
            rows.append([config.name, config.mode, config.ranks, plan["cr"], plan["segments"],
                         "/".join(map(str, config.plan.counts)), len(config.stages),
                         f"{len(checks)}/{len(config.stages)}", f"{max(errors):.1e}" if errors else None,
                         _percent(max(c.used for c in checks)) if checks else None])
        click.echo("  " + format_table(["config", "mode", "P", "CR", "L", "sent/rank", "stages", "verified",
                                        "max |err|", "tol. used"], rows).replace("\n", "\n  "))
        state = "not verified" if no_verify else "SHA-256 verified"
        click.echo(f"  {len(manifest.files)} files, {state}")
