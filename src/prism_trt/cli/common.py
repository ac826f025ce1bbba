"""The `prism-trt` group, and the option groups and helpers its commands share (defined once)."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import NamedTuple

import click

from .. import __version__
from ..errors import PrismError
from .output import COMMAND_KEY, PrismCommand, describe_os_error, output_params, take_output


class PrismGroup(click.Group):
    """A click group that prints every :class:`~prism_trt.errors.PrismError` (an expected problem
    whose message says what to do) as ``Error: ...`` with its exit code, without a traceback; so
    are errors of the operating system (a file that cannot be written, a port in use), naming the
    option whose value they concern. Anything else is a bug and keeps its traceback. Its commands
    and sub-groups take the output flags (:class:`PrismCommand`)."""

    command_class = PrismCommand
    group_class = type  # sub-groups are PrismGroups too

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(output_params())

    def invoke(self, ctx: click.Context):
        take_output(ctx)
        try:
            return super().invoke(ctx)
        except OSError as error:
            if isinstance(error, PrismError):
                failure = click.ClickException(str(error))
            else:
                failure = click.ClickException(describe_os_error(error, _innermost(ctx)))
            failure.exit_code = getattr(error, "exit_code", 1)
            raise failure from error
        except PrismError as error:
            failure = click.ClickException(str(error))
            failure.exit_code = getattr(error, "exit_code", 1)
            raise failure from error


def _innermost(ctx: click.Context) -> click.Context:
    """The context of the command that ran (each command records it in the shared ``meta``)."""
    return ctx.meta.get(COMMAND_KEY, ctx)


class FiniteFloat(click.FloatRange):
    """A float option that refuses ``nan`` and ``inf`` as well as values out of its range: click's
    FLOAT and FloatRange take both (every comparison with nan is false). Every float option uses it."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class DeviceType(click.ParamType):
    """``cpu``, ``cuda`` or ``cuda:N`` of a CUDA device torch sees here; anything else is refused
    where the option is parsed, naming what is available, rather than run somewhere else."""

    name = "device"

    def convert(self, value, param, ctx):
        if value == "cpu":
            return value
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            self.fail(f"{value!r} is not a device; use cpu or cuda:N", param, ctx)
        if device.type == "cpu" and device.index is None:
            return "cpu"
        if device.type != "cuda":
            self.fail(f"{value!r}: engines run on cpu or cuda:N, not {device.type}", param, ctx)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            self.fail(f"{value!r}: torch sees no CUDA device here; available: cpu", param, ctx)
        if device.index is not None and device.index >= count:
            available = ", ".join(["cpu", *(f"cuda:{index}" for index in range(count))])
            self.fail(f"{value!r}: torch sees {count} CUDA device(s) here; available: {available}", param, ctx)
        return value


DEVICE = DeviceType()


def model_options(func):
    """--model / --checkpoint, shared by every command that needs a model."""
    @click.option("--model", "model_name", metavar="NAME",
                  help="timm ViT name, random init (e.g. vit_tiny_patch16_224, deit_small_patch16_224).")
    @click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                  help="Checkpoint in the bundled MNIST ViT format (e.g. $PRISM_TRT_DATA/mnist/vit_mnist.pt).")
    @functools.wraps(func)
    def wrapper(*args, model_name, checkpoint, **kwargs):
        if (model_name is None) == (checkpoint is None):
            raise click.UsageError("give exactly one of --model NAME or --checkpoint PATH")
        return func(*args, model_name=model_name, checkpoint=checkpoint, **kwargs)
    return wrapper


class TextModelOptions(NamedTuple):
    """The text-model flags of `build` (see :func:`text_options`)."""

    seq_lens: tuple[int, ...]  # ascending, distinct; several are sequence buckets
    layers: int | None
    hidden_size: int | None
    heads: int | None
    vocab_size: int | None

    @property
    def resized(self) -> bool:
        return any(v is not None for v in (self.layers, self.hidden_size, self.heads, self.vocab_size))


def is_text_model(name: str | None) -> bool:
    """Whether ``--model NAME`` names a text model (BERT / GPT-2 config) rather than a timm ViT."""
    from ..model.text_adapters import TEXT_CONFIGS

    return name in TEXT_CONFIGS


def text_options(func):
    """--seq-len and the size flags of a text model (--model bert-base-uncased, gpt2, ...)."""
    @list_option("--seq-len", "seq_len", kind=int, default=(128,), show_default=True,
                 help="Text models: the sequence length N the plans partition; requests are padded to it. Several "
                      "(e.g. 32,128) build one engine set per length (sequence buckets): a request runs on the "
                      "shortest that holds it.")
    @click.option("--layers", type=click.IntRange(min=1), default=None, help="Text models: number of blocks.")
    @click.option("--hidden-size", type=click.IntRange(min=1), default=None, help="Text models: width D (MLP 4D).")
    @click.option("--heads", type=click.IntRange(min=1), default=None, help="Text models: attention heads.")
    @click.option("--vocab-size", type=click.IntRange(min=2), default=None, help="Text models: vocabulary size.")
    @functools.wraps(func)
    def wrapper(*args, seq_len, layers, hidden_size, heads, vocab_size, **kwargs):
        return func(*args, text=TextModelOptions(tuple(sorted(set(seq_len))), layers, hidden_size, heads, vocab_size),
                    **kwargs)
    return wrapper


def plan_options(func):
    """--ranks / --cr / --segments / --weights, shared by commands that take a partition."""
    @click.option("--ranks", "-P", type=click.IntRange(min=1), default=2, show_default=True,
                  help="Number of ranks (boards).")
    @list_option("--cr", "crs", help="Compression rate ceil(N/P)/L, rounded to the nearest L; several as "
                                     "--cr 9.9 --cr 4.95 or --cr 9.9,4.95.")
    @list_option("--segments", "-L", "segments", kind=int,
                 help="Segments per partition L instead of a CR; several as -L 3 -L 5 or -L 3,5.")
    @list_option("--weights", help="Relative speed per rank for uneven partitions (e.g. 2,1).")
    @functools.wraps(func)
    def wrapper(*args, weights, **kwargs):
        return func(*args, weights=list(weights) or None, **kwargs)
    return wrapper


def model_spec(model_name: str | None, checkpoint: Path | None):
    """The spec of ``--model NAME`` (a timm ViT or a text model's config) or of ``--checkpoint``."""
    from ..model import load_model, timm_spec

    if is_text_model(model_name):
        from ..model.text_adapters import text_spec

        return text_spec(model_name)
    if model_name is not None:
        return timm_spec(model_name)
    return load_model(checkpoint=checkpoint).spec


def cr_mapping(cr: float, key, seen: dict | None = None) -> str | None:
    """The line saying what a typed ``--cr`` became where L rounds it, e.g. ``--cr 9.9 -> L=3,
    prism-cr8.33`` (``key``: the prism ChainKey it maps to); None where the CR is built as typed.
    ``seen`` (key -> the CR that first asked for it) also names a CR that repeats an earlier chain."""
    first = None if seen is None else seen.setdefault(key, cr)
    repeated = first is not None and first != cr
    if f"{cr:.3g}" == f"{key.cr:.3g}" and not repeated:
        return None
    return f"--cr {cr:g} -> L={key.segments}, {key.label}" + (f" (the chain of --cr {first:g})" if repeated else "")


@click.group(cls=PrismGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prism-trt")
def main() -> None:
    """Distributed ViT inference on edge boards with Prism segment means.

    \b
    Typical flow:
      prism-trt info      --model vit_base_patch16_224
      prism-trt flops     --model vit_base_patch16_224 --ranks 2 --cr 9.9 --cr 4.95 --cr 3.3
      prism-trt accuracy  --checkpoint $PRISM_TRT_DATA/mnist/vit_mnist.pt --ranks 2 --segments 5
      prism-trt build     --checkpoint $PRISM_TRT_DATA/mnist/vit_mnist.pt --ranks 2 --out engines/
      prism-trt accuracy  --engines engines/
    """


def group_options(func):
    """Process-group flags, shared by `run` and `serve`; torchrun's environment fills the gaps."""
    @click.option("--rank", type=click.IntRange(min=0), default=None, help="This board's rank [env RANK].")
    @click.option("--world-size", type=click.IntRange(min=1), default=None, help="Number of boards [env WORLD_SIZE].")
    @click.option("--master-addr", default=None, help="Rank 0's address [env MASTER_ADDR, default 127.0.0.1].")
    @click.option("--master-port", type=click.IntRange(1, 65535), default=None,
                  help="Rank 0's rendezvous port [env MASTER_PORT, default 29500].")
    @click.option("--iface", default=None, help="Network interface for GLOO [env GLOO_SOCKET_IFNAME].")
    @click.option("--timeout", "timeout_s", type=FiniteFloat(min=0.1), default=30.0, show_default=True,
                  help="Seconds before a collective (or joining the group) fails.")
    @click.option("--cluster-token", default=None, metavar="SECRET",
                  help="Shared secret every rank must present to join the group; required unless "
                       "--master-addr is a loopback address [env PRISM_TRT_CLUSTER_TOKEN].")
    @functools.wraps(func)
    def wrapper(*args, rank, world_size, master_addr, master_port, iface, timeout_s, cluster_token, **kwargs):
        from ..runtime.group import GroupConfig

        if rank is None and world_size is None and "RANK" not in os.environ:
            rank, world_size = 0, 1  # a single board
        try:
            group = GroupConfig.from_env_or_flags(rank, world_size, master_addr, master_port, timeout_s, iface,
                                                  cluster_token)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        return func(*args, group=group, **kwargs)
    return wrapper


class NumberList(click.ParamType):
    """Positive finite numbers of one kind (``int`` or ``float``): a multi-valued option takes them
    repeated or comma-separated alike (``--cr 9.9 --cr 4.95`` is ``--cr 9.9,4.95``)."""

    def __init__(self, kind: type):
        self.kind = kind
        self.name = f"{kind.__name__} list"

    def convert(self, value, param, ctx) -> tuple:
        if isinstance(value, tuple):  # already converted (a default given as numbers)
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        try:
            numbers = tuple(self.kind(part) for part in str(value).split(",") if part.strip())
        except ValueError:
            self.fail(f"expected comma-separated {self.kind.__name__}s, got {value!r}", param, ctx)
        if not numbers or not all(math.isfinite(n) and n > 0 for n in numbers):
            self.fail(f"expected positive finite numbers, got {value!r}", param, ctx)
        return numbers


def list_option(*decls: str, kind: type = float, **kwargs):
    """A multi-valued option, the one list convention of the CLI: repeat the flag, separate the
    values with commas, or both; the command gets one flat tuple (empty when not given)."""
    def flatten(ctx, param, value) -> tuple:
        return tuple(number for group in value or () for number in group)

    if "default" in kwargs and kwargs["default"] is not None:
        kwargs["default"] = (",".join(str(v) for v in kwargs["default"]),)
    kwargs.setdefault("metavar", "N[,N...]")
    return click.option(*decls, type=NumberList(kind), multiple=True, callback=flatten, **kwargs)


def exchange_options(func):
    """--staging / --exchange-dtype, shared by `run` and `serve` (workers too: every rank must agree
    on the exchange dtype, checked when the group forms); passed on as ``exchange``, the
    :class:`~prism_trt.runtime.options.RuntimeOptions` fields they set."""
    from ..runtime.options import ExchangeDtype, StagingKind

    @click.option("--staging", type=click.Choice([k.value for k in StagingKind]), default="auto", show_default=True,
                  help="Who copies exchanged features between GPU and host: torch, or pycuda (page-locked buffers, "
                       "async copies on one stream); auto: torch where it has CUDA, else pycuda.")
    @click.option("--exchange-dtype", type=click.Choice([d.value for d in ExchangeDtype]), default="auto",
                  show_default=True,
                  help="Element type of the exchanged means / features: fp16 halves the staged and sent bytes; "
                       "auto: fp16 for fp16 engines, else fp32.")
    @functools.wraps(func)
    def wrapper(*args, staging, exchange_dtype, **kwargs):
        return func(*args, exchange={"staging": StagingKind(staging), "exchange_dtype": ExchangeDtype(exchange_dtype)},
                    **kwargs)
    return wrapper


def placement_options(func):
    """--device / --micro-batches / --cuda-graphs, shared by `run` and `serve`: where a rank's engine
    tensors live and how a batch goes through them (passed on under their own names)."""
    options = [
        click.option("--device", type=DEVICE, default="cpu", show_default=True,
                     help="Where engine tensors live (cpu, cuda:0)."),
        click.option("--micro-batches", type=click.IntRange(min=1), default=None,
                     help="Distributed modes: cut each batch into this many micro-batches in flight, so one's "
                          "exchange hides behind another's compute; 1 runs it whole (rank 0's value is used, workers "
                          "follow it) [default: from batch 8 on, micro-batches of 4 samples, at most 4; 1 with "
                          "--profile-barrier]."),
        click.option("--cuda-graphs", is_flag=True,
                     help="onnxruntime CUDA EP with --device cuda:N: capture one CUDA graph per batch size and replay "
                          "it (fewer kernel launches at small batch; off by default, not measured to win yet)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
