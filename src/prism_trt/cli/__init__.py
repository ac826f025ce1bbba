"""The ``prism-trt`` command line: each subcommand is a thin layer over public functions."""

from ..profiler.testbed_cli import testbed
from . import build_cmds, model_cmds, profile_cmds, runtime_cmds  # noqa: F401  (register the commands)
from .common import main

main.add_command(testbed)

__all__ = ["main"]
