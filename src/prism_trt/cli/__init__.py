"""The ``prism-trt`` command line: each subcommand is a thin layer over public functions.

One module per concern registers its commands on :data:`.common.main`: ``build_cmds`` (build,
inspect), ``model_cmds`` (info, flops, accuracy), ``runtime_cmds`` (run, serve), ``profile_cmds``
(profile, select, model fit, plot), ``testbed_cmds`` (testbed ...), ``demo_cmds`` (demo).
"""

from . import build_cmds, demo_cmds, model_cmds, profile_cmds, runtime_cmds  # noqa: F401  (register the commands)
from .common import main
from .testbed_cmds import testbed

main.add_command(testbed)

__all__ = ["main"]
