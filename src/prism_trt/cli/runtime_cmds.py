"""Commands that run ranks: run, serve."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import click

from ..core.chain_key import MODE_NAMES, ChainKey, Mode
from ..engines.manifest import rank_directory
from ..errors import PrismError
from ..runtime.rendezvous import agent_hosts_store
from ..serve.http_server import HttpLimits, check_exposure
from .common import FiniteFloat, cr_mapping, exchange_options, group_options, main, placement_options
from .output import bind_error, check_port_free


class HttpOptions(NamedTuple):
    """`serve`'s HTTP flags, gathered by :func:`http_options`."""

    host: str
    port: int
    token: str | None
    allow_unauthenticated: bool
    max_body_bytes: int | None
    max_image_bytes: int | None
    limits: HttpLimits


def _breakdown_table(per_rank) -> str:
    from ..engines.measured import PHASES
    from ..report import format_table

    rows = []
    for rank, times in enumerate(per_rank):
        total = times.total or 1.0
        row = [f"rank{rank}"]
        for phase in PHASES:
            value = getattr(times, phase)
            row.append(None if value is None else f"{value:.2f} ({100 * value / total:.0f}%)")
        rows.append(row + [f"{times.total:.2f}", int(times.bytes_sent), int(times.bytes_received)])
    headers = [f"{phase.upper() if phase in ('d2h', 'h2d') else phase} ms" for phase in PHASES]
    return format_table(["rank", *headers, "total ms", "sent B", "recv B"], rows)


def chain_options(with_auto: bool):
    """--mode / --cr, with the same default and meaning on `run` and `serve` (which adds auto)."""
    auto = ", auto (chosen per batch from a performance map, --map)" if with_auto else ""

    def decorate(func):
        @click.option("--mode", type=click.Choice([*MODE_NAMES, *(["auto"] if with_auto else [])]), default=None,
                      help=f"How batches run: local (rank 0 alone), voltage (every token exchanged), prism (segment "
                           f"means at --cr){auto} [default: prism with --cr, else local].")
        @click.option("--cr", type=FiniteFloat(), default=None,
                      help="Compression rate of the prism chain: one that was built (it maps to L as at build).")
        @functools.wraps(func)
        def wrapper(*args, mode, cr, **kwargs):
            return func(*args, mode=mode or (Mode.PRISM.value if cr is not None else Mode.LOCAL.value), cr=cr,
                        **kwargs)
        return wrapper
    return decorate


@main.command()
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A build directory (rankN/ is picked by rank) or one rank's engine directory.")
@group_options
@chain_options(with_auto=False)
@click.option("--batch", "-B", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images (or sequences) per inference; at most the build's --max-batch.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed runs before the timed ones.")
@click.option("--profile-barrier", is_flag=True,
              help="Barrier before every collective: splits comm into wait (rank skew) and transfer.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Engine intra-op threads.")
@placement_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (rank 0) instead of the table.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the result as JSON to this file (rank 0).")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a torch profiler Chrome trace of the timed runs (rank 0).")
@click.option("--seq-len", "positions", type=click.IntRange(min=1), default=None,
              help="Text models: positions per request [default: the longest built --seq-len]; a shorter one runs "
                   "on the shortest sequence bucket that holds it.")
@exchange_options
def run(engines, group, mode, cr, batch, repeat, warmup, profile_barrier, threads, device, micro_batches, cuda_graphs,
        as_json,
        json_out, trace, positions, exchange):
    """Time inferences and print the per-rank breakdown (compute / staging / comm / other).

    Start the same command on every board with its --rank (or under torchrun); rank 0 drives and
    prints, the others follow until rank 0 is done. Example for two ranks on one host:

    \b
      prism-trt run --engines engines/ --rank 1 --world-size 2 &
      prism-trt run --engines engines/ --rank 0 --world-size 2 --cr 9.9 --batch 8
    """
    from ..runtime import RuntimeOptions, open_executor
    from ..runtime.distributed import run_worker
    from ..runtime.measure import measure
    from ..runtime.threads import default_threads

    options = RuntimeOptions(threads or default_threads(group), device, profile_barrier, micro_batches=micro_batches,
                             cuda_graphs=cuda_graphs, **exchange)
    # On every rank (the same command runs on each); a worker checks a batch it was given, not the default one.
    given = click.get_current_context().get_parameter_source("batch") is not click.core.ParameterSource.DEFAULT
    key = check_before_join(engines, group.rank, mode, cr, batch if group.rank == 0 or given else None)
    if group.rank != 0:  # workers follow rank 0's choices
        batches = run_worker(rank_directory(engines, group.rank), group, options)
        click.echo(f"rank {group.rank}: ran {batches} batches, stopped by rank 0", err=as_json)
        return
    check_rendezvous_port(group)
    executor = open_executor(engines, group, options)
    try:
        result = measure(executor, executor.loaded(key), batch, warmup, repeat, trace=trace, positions=positions)
    finally:
        executor.close()
    if json_out:
        from ..engines.json_record import write_json_atomic

        write_json_atomic(json_out, result.to_dict())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    latency = result.latency
    bucket = f" (n={positions}, bucket N={executor.buckets.for_length(positions).length})" if positions else ""
    click.echo(f"{executor.model_name} {key.label} batch {batch}{bucket}: mean {latency.mean_ms:.2f} ms "
               f"(p50 {latency.p50_ms:.2f}, p90 {latency.p90_ms:.2f}, sd {latency.stdev_ms:.2f}), "
               f"{latency.per_sample_ms:.2f} ms/sample over {repeat} runs"
               + (" -- FELL BACK to local" if result.fell_back else ""))
    click.echo(_breakdown_table(result.per_rank))
    wait_note = "comm is transfer only; wait = skew at the barrier" if profile_barrier else \
        "comm includes waiting for the slowest rank (use --profile-barrier to split it)"
    click.echo(f"({wait_note}; staging = D2H + H2D copies around each all-gather)")
    if trace:
        click.echo(f"trace written to {trace} (open in chrome://tracing or ui.perfetto.dev)")




def check_rendezvous_port(group) -> None:
    """Rank 0 hosts the rendezvous: its port in use is one Error: line naming --master-port at once
    (unless torchrun's agent hosts it there)."""
    if group.world_size > 1 and not agent_hosts_store(group):
        check_port_free(group.master_addr, group.master_port, "--master-port", "--master-addr", foreign_host_ok=True)


def check_before_join(engines: Path, rank: int, mode: str, cr: float | None, batch: int | None = None) -> ChainKey:
    """The built chain ``--mode``/``--cr`` stand for, checked with the batch against this rank's
    engines before any group forms: a chain, CR or batch they do not hold is one Error: line at once
    on every rank, not a join timeout (the other ranks may not be up). Rank 0 says what a rounded
    CR became (``--cr 9.9 -> L=3, prism-cr8.33``), the one place the CR is mapped to L."""
    from ..engines.manifest import Manifest, ManifestError
    from ..errors import UsageError
    from ..runtime.measure import check_batch

    manifest = Manifest.read(rank_directory(engines, rank))
    if mode in (Mode.VOLTAGE, Mode.PRISM) and manifest.world_size == 1:
        raise UsageError(f"{mode} mode needs a build for --ranks >= 2 (these engines are for one rank)")
    wanted = ChainKey.parse(mode, cr, manifest.num_tokens, manifest.world_size)
    mapping = cr_mapping(cr, wanted) if cr is not None else None
    key = wanted
    if wanted.mode is not Mode.LOCAL or rank == 0:  # the local chain is rank 0's alone
        try:
            key = manifest.config(wanted).key
        except ManifestError as error:  # the engines are fine; the option asks for one they do not hold
            raise UsageError(f"{mapping}: {error}" if mapping else str(error)) from None
    if batch is not None:
        check_batch(batch, manifest.build_options.max_batch)
    if mapping and rank == 0:
        click.echo(mapping, err=True)
    return key


class _Stopped(Exception):
    """SIGTERM reached rank 0's server."""


def _check_token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An empty token, from the flag or from an empty PRISM_TRT_TOKEN, is an error: it must never
    silently turn authentication off (click reads an empty variable as unset)."""
    import os

    from ..serve.app import check_token

    if value is None and os.environ.get("PRISM_TRT_TOKEN") == "":
        raise click.BadParameter("PRISM_TRT_TOKEN is set but empty; set it to the token, or unset it to serve "
                                 "without authentication", ctx, param)
    if value is not None:
        try:
            check_token(value)
        except ValueError as error:
            raise click.BadParameter(str(error), ctx, param) from None
    return value


def _check_model_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ..serve.app import check_model_name

    if value is not None:
        try:
            check_model_name(value)
        except ValueError as error:
            raise click.BadParameter(str(error), ctx, param) from None
    return value


def http_options(func):
    """The HTTP server's flags for `serve`: address, authentication, body and read limits."""
    seconds = FiniteFloat(min=0, min_open=True)

    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to bind (rank 0). A non-loopback address (0.0.0.0 exposes every interface) needs "
                       "--token or --allow-unauthenticated.")
    @click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
                  help="HTTP port to listen on (rank 0).")
    @click.option("--token", envvar="PRISM_TRT_TOKEN", default=None, callback=_check_token,
                  help="Require `Authorization: Bearer TOKEN` on every endpoint but /v2/health/live "
                       "[env PRISM_TRT_TOKEN; empty is an error].")
    @click.option("--allow-unauthenticated", is_flag=True,
                  help="Serve a non-loopback --host without a token (only on a network you trust).")
    @click.option("--max-body-bytes", type=click.IntRange(min=1), default=None,
                  help="/infer body limit, JSON or binary [default: a full batch of the model: 32 bytes a value as "
                       "JSON, 4 as binary, + 64 KiB].")
    @click.option("--max-image-bytes", type=click.IntRange(min=1), default=None,
                  help="/infer/image body limit [default: 2 bytes a pixel of the pixel cap, max(4 Mpx, 64 x the "
                       "model's input), + 64 KiB].")
    @click.option("--header-timeout", type=seconds, default=HttpLimits.header_timeout_s, show_default=True,
                  help="Seconds for a request's line and headers to arrive, from connect or the previous response "
                       "(408 and close).")
    @click.option("--body-timeout", type=seconds, default=HttpLimits.body_timeout_s, show_default=True,
                  help="Longest silence while a request body is outstanding (408 and close).")
    @click.option("--min-body-rate", type=FiniteFloat(min=0, min_open=True), default=HttpLimits.min_body_bytes_per_s,
                  show_default=True, help="Bytes/s a request body must average once --body-timeout has passed since "
                                          "it began (408 and close).")
    @click.option("--keep-alive", type=seconds, default=HttpLimits.keep_alive_s, show_default=True,
                  help="Seconds an idle keep-alive connection stays open.")
    @click.option("--max-header-bytes", type=click.IntRange(min=256), default=HttpLimits.max_header_bytes,
                  show_default=True, help="Largest request line + headers (431 above).")
    @click.option("--max-connections", type=click.IntRange(min=1), default=HttpLimits.max_connections,
                  show_default=True, help="Open connections served at once; requests on more get 503.")
    @click.option("--backlog", type=click.IntRange(min=1), default=HttpLimits.backlog, show_default=True,
                  help="Connections the kernel queues before the server accepts them.")
    @functools.wraps(func)
    def wrapper(*args, host, port, token, allow_unauthenticated, max_body_bytes, max_image_bytes, header_timeout,
                body_timeout, min_body_rate, keep_alive, max_header_bytes, max_connections, backlog, **kwargs):
        limits = HttpLimits(header_timeout_s=header_timeout, body_timeout_s=body_timeout, keep_alive_s=keep_alive,
                            max_header_bytes=max_header_bytes, max_connections=max_connections, backlog=backlog,
                            min_body_bytes_per_s=min_body_rate)
        http = HttpOptions(host, port, token, allow_unauthenticated, max_body_bytes, max_image_bytes, limits)
        return func(*args, http=http, **kwargs)
    return wrapper


@main.command()
@click.option("--engines", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A build directory (rankN/ is picked by rank) or one rank's engine directory.")
@group_options
@chain_options(with_auto=True)
@click.option("--map", "map_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Performance map for --mode auto (from `prism-trt profile`).")
@click.option("--objective", type=click.Choice(["latency", "energy"]), default="latency", show_default=True,
              help="--mode auto: what the choice minimises per sample.")
@click.option("--min-agreement", type=FiniteFloat(0, 1), default=0.99, show_default=True,
              help="--mode auto: never choose a CR whose agreement with the local model is lower.")
@click.option("--online/--no-online", default=True, show_default=True,
              help="--mode auto: refine the map's predictions with every batch's measured latency, per (mode, batch, "
                   "bandwidth bucket), track the link rate from the collectives, and explore now and then. "
                   "--no-online chooses from the map and the latency model alone (needed for --objective energy).")
@click.option("--explore-fraction", type=FiniteFloat(0, 0.5), default=0.05, show_default=True,
              help="--mode auto: at most this share of batches runs a mode other than the predicted best (0: never).")
@click.option("--explore-budget", type=FiniteFloat(min=0), default=0.25, show_default=True,
              help="--mode auto: explore only modes predicted within (1 + this) x the best latency; modes below "
                   "--min-agreement are never explored.")
@click.option("--save-map", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--mode auto: write the refined performance map here (atomically) every --save-every batches "
                   "and on shutdown; it loads like a profiled map and is bound to the same engines.")
@click.option("--save-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Batches between two writes of --save-map.")
@http_options
@click.option("--max-wait-ms", type=FiniteFloat(min=0), default=5.0, show_default=True,
              help="How long a batch waits for more requests.")
@click.option("--model-name", metavar="NAME", default=None, callback=_check_model_name,
              help="The name clients use in /v2/models/NAME [default: the model's own name from the build].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Engine intra-op threads.")
@click.option("--link-probe", type=FiniteFloat(min=0), default=1.0, show_default=True,
              help="Seconds without a distributed batch after which rank 0 times a small payload over the link, "
                   "so the link's rate stays known while batches run locally (0: heartbeats only).")
@placement_options
@exchange_options
def serve(engines, group, mode, cr, map_path, objective, min_agreement, online, explore_fraction, explore_budget,
          save_map, save_every, http, max_wait_ms, model_name, threads, device, link_probe, micro_batches, cuda_graphs,
          exchange):
    """Serve classifications over the KServe v2 / Open Inference Protocol HTTP API.

    Run the same command on every board with its --rank (or under torchrun): rank 0 loads its
    engines, joins the group and serves HTTP; the other ranks follow rank 0. If a worker dies,
    rank 0 answers with its local chain and reports degraded readiness until the worker is back:
    start it again with the same command and the group re-forms without restarting rank 0.
    Ctrl-C / SIGTERM on rank 0 stops every rank.
    """
    import signal

    from ..profiler.adaptive.online import OnlineOptions
    from ..profiler.adaptive.serving import SelectorOptions, load_map, make_selector
    from ..runtime import RuntimeOptions, open_executor
    from ..runtime.distributed import run_worker
    from ..runtime.threads import default_threads
    from ..serve import create_app
    from ..serve import serve as run_server

    options = RuntimeOptions(threads or default_threads(group), device, link_probe_s=link_probe,
                             micro_batches=micro_batches, cuda_graphs=cuda_graphs, **exchange)
    if group.rank != 0:
        if mode != "auto":  # the same command runs on every rank: its chain is checked on each
            check_before_join(engines, group.rank, mode, cr)

        def stop(signum, frame):
            raise SystemExit(f"rank {group.rank}: signal {signum}, leaving the group")

        signal.signal(signal.SIGTERM, stop)
        batches = run_worker(rank_directory(engines, group.rank), group, options)
        click.echo(f"rank {group.rank}: served {batches} batches, stopped by rank 0")
        return
    selection = SelectorOptions(mode, cr, map_path, objective, min_agreement, online,
                                OnlineOptions(explore_fraction=explore_fraction, explore_budget=explore_budget),
                                save_map, save_every)
    selection.check()
    if not http.allow_unauthenticated:  # refused before loading anything; serve() warns when it is allowed
        try:
            check_exposure(http.host, http.token is not None, allow_unauthenticated=False)
        except PrismError as error:
            raise click.UsageError(str(error)) from None
    if mode in (Mode.VOLTAGE, Mode.PRISM) and group.world_size == 1:
        raise click.UsageError(f"{mode} mode needs --world-size >= 2")
    if mode != "auto":  # before any group forms (auto's map is checked by load_map)
        check_before_join(engines, group.rank, mode, cr)
    check_port_free(http.host, http.port, "--port", "--host")
    chooser = load_map(selection, engines)  # a bad map is refused before the join, not after its timeout
    check_rendezvous_port(group)
    executor = open_executor(engines, group, options)
    selector = None
    try:
        selector = make_selector(selection, executor, engines, chooser)
        app = create_app(executor, selector, token=http.token, max_wait_ms=max_wait_ms,
                         max_body_bytes=http.max_body_bytes, max_image_bytes=http.max_image_bytes,
                         model_name=model_name)
        served = app.state.server.model_name
        click.echo(f"serving {served} ({mode}) on http://{http.host}:{http.port}/v2/models/{served}")

        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then restores the handlers it found and
        # re-raises the signal: with this handler in place that ends here, so the workers get stopped.
        def stopped(signum, frame):
            raise _Stopped(signum)

        signal.signal(signal.SIGTERM, stopped)
        run_server(app, host=http.host, port=http.port, limits=http.limits,
                   allow_unauthenticated=http.allow_unauthenticated)
    except (_Stopped, KeyboardInterrupt):
        click.echo("rank 0: stopping every rank")
    except OSError as error:  # the address is in use or not ours
        if isinstance(error, PrismError):  # a missing file, say: its own message is the right one
            raise
        raise click.ClickException(bind_error(error, http.host, http.port, "--port")) from None
    finally:
        _save_refined_map(selector)
        executor.close()


def _save_refined_map(selector) -> None:
    """On shutdown: the refined map, if one was asked for; a failure is reported, not raised, so
    the workers are still stopped."""
    if getattr(selector, "save_path", None) is None:
        return
    try:
        path = selector.save()
        click.echo(f"refined performance map written to {path} ({selector.observed} batches observed)")
    except (PrismError, OSError) as error:
        click.echo(f"could not write the refined performance map to {selector.save_path}: {error}", err=True)
