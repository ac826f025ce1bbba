"""Model and accounting commands: info, flops, accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import FiniteFloat, is_text_model, main, model_options, model_spec, plan_options
from .output import show_progress


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the spec as JSON.")
def info(model_name, checkpoint, as_json):
    """Show a model's spec: tokens, widths, heads, pooling (a text model's: its config)."""
    spec = model_spec(model_name, checkpoint)
    if as_json:
        click.echo(json.dumps(spec.to_dict(), indent=2))
        return
    for key, value in spec.to_dict().items():
        click.echo(f"{key:>18}: {value}")
    if is_text_model(model_name):  # a text model's N is the --seq-len of its build
        return
    click.echo(f"{'tokens (N)':>18}: {spec.num_tokens} ({spec.num_prefix_tokens} prefix + {spec.num_patches} patches)")
    click.echo(f"{'attention width':>18}: {spec.attn_dim} (H*d_h)")


@main.command()
@model_options
@plan_options
@click.option("--batch", "-B", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size for the byte counts.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Element type of the exchanged features.")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Text models (bert-base-uncased, gpt2, ...): sequence length N [default: 256 for BERT, 1024 "
                   "for GPT-2].")
@click.option("--cls-segment/--no-cls-segment", default=True, show_default=True,
              help="BERT: send [CLS] as its own segment (as prism-trt runs it) or average it into rank 0's first "
                   "segment (as the paper's 51.24 % counts it).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (local, voltage, prism[...]).")
def flops(model_name, checkpoint, ranks, crs, segments, weights, batch, dtype, seq_len, cls_segment, as_json):
    """GFLOPs per device and bytes exchanged per block: local vs Voltage vs Prism.

    Reproduces Table 3 of the Prism-on-Jetson paper with
    `prism-trt flops --model vit_base_patch16_224 --ranks 2 --cr 9.9 --cr 4.95 --cr 3.3`, and the
    PRISM paper's BERT figures (99.2 % less communication, 51.24 % less computation at CR 128) with
    `prism-trt flops --model bert-base-uncased --seq-len 256 --ranks 2 --cr 128 --no-cls-segment`.
    """
    from ..core.accounting import flops_report, text_flops_report
    from ..core.chain_key import Mode
    from ..model.text_adapters import TEXT_CONFIGS, text_spec
    from ..report import format_table

    element_bytes = 2 if dtype == "fp16" else 4
    if model_name in TEXT_CONFIGS:
        spec = text_spec(model_name)
        seq_len = seq_len or min(spec.max_positions, 256 if spec.family == "bert" else 1024)
        report = text_flops_report(spec, seq_len, ranks, list(crs), list(segments), batch, element_bytes, weights,
                                   cls_segment)
    else:
        if seq_len is not None:
            raise click.UsageError(f"--seq-len is for text models ({', '.join(TEXT_CONFIGS)}); a ViT's N is fixed")
        spec = model_spec(model_name, checkpoint)
        report = flops_report(spec, ranks, list(crs), list(segments), batch, element_bytes, weights)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    local_gflops = report["local"]["gflops_per_device"]
    rows = []
    for entry in [report["local"], report["voltage"], *report["prism"]]:
        speedup = None if entry["strategy"] == Mode.LOCAL else 1 - entry["gflops_per_device"] / local_gflops
        reduction = entry["comm_reduction"] if entry["strategy"] == Mode.PRISM else None
        rows.append([entry["strategy"], entry["ranks"], entry["cr"], entry["segments"], entry["gflops_per_device"],
                     None if speedup is None else f"{100 * speedup:.2f}%",
                     None if reduction is None else f"{100 * reduction:.1f}%",
                     "/".join(str(b) for b in entry["bytes_per_block_per_rank"]) or None])
    click.echo(f"{spec.name}: N={report['tokens']} tokens, partition {report['partition']}, batch {batch}, {dtype}")
    click.echo(format_table(["strategy", "P", "CR", "L", "GFLOPs/dev", "compute saved", "comm reduction",
                             "bytes/block/rank"], rows))


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint in the bundled MNIST ViT format.")
@click.option("--engines", "engines", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="A build directory of the MNIST checkpoint instead: the test set through its engines, every "
                   "chain in process and over a GLOO group of its P ranks on loopback.")
@click.option("--distributed/--no-distributed", default=True, show_default=True,
              help="--engines: also run the chains over a real GLOO group (one process per rank).")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=1), default=120.0, show_default=True,
              help="--engines: seconds before a collective (or joining the group) fails.")
@click.option("--model", "model_name", metavar="NAME", default=None,
              help="A bundled trained text model instead (gpt2-pydoc): next-token accuracy on its held-out text.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                   "[default: $PRISM_TRT_DATA/mnist or ../shared/data/mnist].")
@plan_options
@click.option("--means-source", type=click.Choice(["ln1", "input", "both"]), default="ln1", show_default=True,
              help="Average LN1(x) (exact keys/values of the mean) or the block input x.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Text models: window length N the plans partition [default: the model's context].")
@click.option("--no-exchange-baseline", "baseline", is_flag=True,
              help="Text models: add a row where each rank sees only its own partition (no means, means 'none').")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N test images (text: the first N windows).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 500 images / 64 windows]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def accuracy(checkpoint, engines, distributed, timeout_s, model_name, data, ranks, crs, segments, weights,
             means_source, seq_len, baseline, limit, batch_size, threads, as_json):
    """Accuracy of Prism plans, and agreement with the unpartitioned model: MNIST test images for the
    ViT checkpoint (--checkpoint), next-byte prediction on held-out text for a bundled trained text
    model (--model gpt2-pydoc); or of the engines a build wrote (--engines DIR).

    Without --cr/--segments the plan is CR=1 (Voltage), which must equal the unpartitioned model.
    With --engines the chains are the build's: each is scored in process and over a GLOO group, by
    accuracy, agreement with the local (P=1) engines and its logits against theirs; the distributed
    logits must match the same chain's in-process ones within the build precision's tolerance.
    """
    import torch

    if sum(x is not None for x in (checkpoint, model_name, engines)) != 1:
        raise click.UsageError("give exactly one of --checkpoint (MNIST ViT), --model (a bundled text model) or "
                               "--engines (a build of the MNIST ViT)")
    if threads:
        torch.set_num_threads(threads)
    progress = show_progress()
    if engines is not None:
        _engine_accuracy(engines, data, limit, batch_size, threads or 1, distributed, timeout_s, as_json,
                         (crs, segments, weights, seq_len, baseline, means_source != "ln1"))
        return
    if model_name is not None:
        if data is not None:
            raise click.UsageError("--data is for the MNIST checkpoint; text models read their bundled held-out text")
        _text_accuracy(model_name, ranks, crs, segments, weights, means_source, seq_len, baseline, limit,
                       batch_size or 64, as_json, progress)
        return
    if seq_len is not None or baseline:
        raise click.UsageError("--seq-len and --no-exchange-baseline are for text models (--model)")

    from ..core import make_partition_plan, make_segment_plan, voltage_plan
    from ..core.accuracy import evaluate
    from ..data import MnistTestSet, data_dir
    from ..model import load_model
    from ..report import format_table

    model = load_model(checkpoint=checkpoint)
    spec = model.spec
    partition = make_partition_plan(spec.num_tokens, spec.num_prefix_tokens, ranks, weights)
    plans = [make_segment_plan(partition, cr=cr) for cr in crs]
    plans += [make_segment_plan(partition, segments=L) for L in segments]
    plans = plans or [voltage_plan(partition)]
    dataset = MnistTestSet(data or data_dir() / "mnist", spec.mean[0], spec.std[0], limit)
    sources = ["ln1", "input"] if means_source == "both" else [means_source]
    results = evaluate(model, dataset.batches(batch_size or 500), plans, sources, total=len(dataset),
                       progress=progress)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    click.echo(f"unpartitioned: {results[0].reference_correct}/{results[0].total}")
    click.echo(format_table(
        ["P", "L", "CR", "means", "correct/total", "accuracy", "agreement"],
        [[r.ranks, r.segments, r.cr, r.means_source, f"{r.correct}/{r.total}", f"{100 * r.accuracy:.2f}%",
          f"{100 * r.agreement:.2f}%"] for r in results]))


def _engine_accuracy(engines, data, limit, batch_size, threads, distributed, timeout_s, as_json, unused) -> None:
    """`accuracy --engines`: the MNIST test set through a build's engines (see
    :mod:`prism_trt.workflows.engine_accuracy`)."""
    from ..data import MnistTestSet, data_dir
    from ..engines.manifest import Manifest, rank_directory
    from ..report import format_table
    from ..workflows.engine_accuracy import evaluate_engines

    if any(unused):
        raise click.UsageError("--engines scores the chains the build holds: --cr, --segments, --weights, --seq-len, "
                               "--no-exchange-baseline and --means-source do not apply")
    manifest = Manifest.read(rank_directory(engines, 0))
    spec = manifest.spec
    dataset = MnistTestSet(data or data_dir() / "mnist", spec.mean[0], spec.std[0], limit)
    size = batch_size or manifest.build_options.max_batch
    scores = evaluate_engines(engines, dataset.batches(size), distributed, threads, timeout_s)
    if as_json:
        click.echo(json.dumps([score.to_dict() for score in scores], indent=2))
        return
    click.echo(f"{spec.name} engines in {engines} ({manifest.backend.name} on {manifest.backend.device}, "
               f"{manifest.build_options.precision}), {len(dataset)} MNIST test images")
    click.echo(format_table(
        ["chain", "run", "P", "correct/total", "accuracy", "agreement", "max |logit diff| vs local",
         "vs in-process (tol. used)"],
        [[s.key.label, s.execution, s.ranks, f"{s.correct}/{s.total}", f"{100 * s.accuracy:.2f}%",
          f"{100 * s.agreement:.2f}%", f"{s.versus_local.max_abs_error:.2g}",
          None if s.versus_in_process is None else
          f"{s.versus_in_process.max_abs_error:.2g} ({100 * s.versus_in_process.used:.2g} %)"] for s in scores]))
    click.echo("agreement: same top-1 as the local (P=1) engines; tol. used: share of the precision's atol + "
               "rtol*|ref| the distributed logits needed against the same chain in process (100 % fails)")


def _text_accuracy(model_name, ranks, crs, segments, weights, means_source, seq_len, baseline, limit, batch_size,
                   as_json, progress) -> None:
    """`accuracy --model`: next-token accuracy / agreement of each plan on the bundled held-out text."""
    from ..core import make_segment_plan, text_partition, voltage_plan
    from ..core.text_accuracy import NO_EXCHANGE, evaluate_text
    from ..data.text_corpus import HELDOUT_FILE, TextWindows, read_corpus
    from ..model.text_adapters import PRETRAINED_TEXT, load_text_model
    from ..report import format_table

    if model_name not in PRETRAINED_TEXT:
        raise click.UsageError(f"accuracy needs trained weights: --model takes {', '.join(PRETRAINED_TEXT)} "
                               f"(other text models are random-init), or use --checkpoint for the MNIST ViT")
    model = load_text_model(model_name)
    spec = model.spec
    seq_len = seq_len or spec.max_positions
    partition = text_partition(spec, seq_len, ranks, weights)
    plans = [make_segment_plan(partition, cr=cr) for cr in crs]
    plans += [make_segment_plan(partition, segments=L) for L in segments]
    plans = plans or [voltage_plan(partition)]
    windows = TextWindows(read_corpus(HELDOUT_FILE), seq_len, limit)
    sources = ["ln1", "input"] if means_source == "both" else [means_source]
    results = evaluate_text(model, windows.batches(batch_size), plans, sources, total=len(windows), progress=progress)
    if baseline:  # one pass more: it does not depend on L, so the first plan's partition stands for all
        results += evaluate_text(model, windows.batches(batch_size), plans[:1], [NO_EXCHANGE], total=len(windows),
                                 progress=progress)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    first = results[0]
    click.echo(f"{spec.name}: {len(windows)} windows of N={seq_len} bytes from its held-out text, {first.total} "
               f"next-byte targets; unpartitioned: {100 * first.reference_accuracy:.2f}% "
               f"(loss {first.reference_loss:.4f} nats)")
    click.echo(format_table(
        ["P", "L", "CR", "means", "tokens", "accuracy", "agreement", "agreement ranks>=1", "loss"],
        [[r.ranks, r.segments, r.cr, r.means_source, r.total, f"{100 * r.accuracy:.2f}%",
          f"{100 * r.agreement:.2f}%", f"{100 * r.agreement_approx:.2f}%", f"{r.loss:.4f}"] for r in results]))
