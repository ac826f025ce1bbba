"""What a command prints besides its result, the same for every command: the -v / -q / --log-level
flags and the logging they set up, progress bars only on a terminal, and errors of the operating
system as one line naming the option to change."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import click

LOG_LEVELS = ("debug", "info", "warning", "error")


class Output(NamedTuple):
    """What a command prints besides its result: ``verbosity`` -1 (-q), 0, 1 (-v), 2 (-vv), or an
    explicit ``log_level``. Progress bars show only on a terminal, and never with -q."""

    verbosity: int = 0
    log_level: str | None = None

    @property
    def quiet(self) -> bool:
        return self.verbosity < 0

    @property
    def progress(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    def levels(self) -> tuple[int, int]:
        """(prism-trt's loggers, every other library's): prism-trt says INFO by default, libraries
        only warnings, unless -v (INFO), -vv (DEBUG) or --log-level says otherwise."""
        if self.log_level is not None:
            level = getattr(logging, self.log_level.upper())
            return level, level
        return {-1: (logging.WARNING, logging.ERROR), 0: (logging.INFO, logging.WARNING),
                1: (logging.INFO, logging.INFO)}.get(self.verbosity, (logging.DEBUG, logging.DEBUG))


OUTPUT_KEY, COMMAND_KEY = "prism_trt.output", "prism_trt.command"


def output_params() -> list[click.Option]:
    """-v / -q / --log-level: on the group and on every command (either place works)."""
    return [
        click.Option(["-v", "--verbose"], count=True,
                     help="More log output: -v shows every library's INFO lines and onnxruntime's warnings, -vv "
                          "DEBUG."),
        click.Option(["-q", "--quiet"], is_flag=True, help="Only warnings and errors; no progress bars."),
        click.Option(["--log-level"], type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
                     help="Log level of prism-trt and every library (overrides -v/-q) [env PRISM_TRT_LOG_LEVEL].",
                     envvar="PRISM_TRT_LOG_LEVEL"),
    ]


def take_output(ctx: click.Context) -> None:
    """Pop the output flags from ``ctx.params``, merge them with the group's and apply them."""
    verbose, quiet, level = (ctx.params.pop(name, None) for name in ("verbose", "quiet", "log_level"))
    before = ctx.meta.get(OUTPUT_KEY, Output())
    verbosity = -1 if quiet or before.quiet else before.verbosity + (verbose or 0)
    output = Output(verbosity, level or before.log_level)
    ctx.meta[OUTPUT_KEY] = output
    configure_logging(output)


def configure_logging(output: Output) -> None:
    """One log format for every command; onnxruntime's own logger stays at errors unless verbose
    (it prints a warning per session otherwise, e.g. for every CUDA session)."""
    ours, others = output.levels()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(others)
    logging.getLogger("prism_trt").setLevel(ours)
    try:
        import onnxruntime
    except ImportError:  # an install without the onnxruntime extra: nothing to quieten
        return
    onnxruntime.set_default_logger_severity(_onnxruntime_severity(output, others))


def _onnxruntime_severity(output: Output, level: int) -> int:
    """onnxruntime's severity (0 verbose, 1 info, 2 warning, 3 error) for the libraries' log level:
    errors only unless -v or --log-level asks for more; its INFO lines only at DEBUG."""
    if level >= logging.ERROR or (output.log_level is None and output.verbosity < 1):
        return 3
    return 0 if level <= logging.DEBUG else 2


def current_output() -> Output:
    """The output settings of the command running now (defaults outside a click command)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(OUTPUT_KEY, Output()) if ctx is not None else Output()


def show_progress() -> bool:
    """Whether this command draws progress bars: on a terminal, and not with -q."""
    return current_output().progress


class PrismCommand(click.Command):
    """A command with the output flags (-v, -q, --log-level) every prism-trt command takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(output_params())

    def invoke(self, ctx: click.Context):
        take_output(ctx)
        ctx.meta[COMMAND_KEY] = ctx
        return super().invoke(ctx)


_OS_HINTS = {errno.EADDRINUSE: "is in use by another process; stop it or pick another",
             errno.EACCES: "is not permitted for this user; pick another (ports below 1024 need root)",
             errno.EADDRNOTAVAIL: "is not an address of this machine; pick another",
             errno.ENOENT: "does not exist; check",
             errno.EISDIR: "is a directory; give a file path with",
             errno.ENOTDIR: "has a part that is not a directory; check",
             errno.ENOSPC: "is on a full disk; free space or pick another"}


def describe_os_error(error: OSError, ctx: click.Context | None) -> str:
    """An OS error as one line naming the option whose value it concerns, where one does."""
    text = error.strerror or str(error)
    flag = _option_for(error, ctx) if ctx is not None else None
    if flag is None:
        return f"{text}: {error.filename}" if error.filename else str(error)
    name, value = flag
    hint = _OS_HINTS.get(error.errno, "failed; check")
    return f"{name} {value}: {text} ({error.filename or value} {hint} {name})"


def bind_error(error: OSError, host: str, port: int, port_flag: str, host_flag: str = "--host") -> str:
    """A listening socket's failure (the port in use, not permitted, the address not ours) as one
    line naming the flag to change."""
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{host_flag} {host}: {error.strerror} ({host} {_OS_HINTS[error.errno]} {host_flag})"
    hint = _OS_HINTS.get(error.errno, "could not be bound; pick another")
    return f"{port_flag} {port}: {error.strerror or error} on {host} (port {port} {hint} {port_flag})"


def check_port_free(host: str, port: int, port_flag: str, host_flag: str, foreign_host_ok: bool = False) -> None:
    """Bind ``host:port`` once, as a server will (SO_REUSEADDR), before anything loads or joins: a
    port in use or not permitted is one Error: line naming ``port_flag`` now, not a failure after
    the group formed. ``foreign_host_ok``: an address this machine does not have is left to the
    caller (the rendezvous says what is wrong with its own address)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        if foreign_host_ok:
            return
        raise click.ClickException(f"{host_flag} {host}: {error.strerror}; give an address of this machine") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if foreign_host_ok and error.errno == errno.EADDRNOTAVAIL:
                return
            raise click.ClickException(bind_error(error, host, port, port_flag, host_flag)) from None


def _option_for(error: OSError, ctx: click.Context) -> tuple[str, object] | None:
    """The (flag, value) of the running command whose path holds ``error.filename``."""
    if error.filename is None:
        return None
    target = Path(str(error.filename))
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Option) and isinstance(value, Path):
            if target == value or value in target.parents or target in value.parents:
                return param.opts[-1], value
    return None
