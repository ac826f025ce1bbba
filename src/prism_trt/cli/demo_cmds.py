"""`prism-trt demo` (the pipeline itself is :mod:`prism_trt.workflows.demo`, imported when the command runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import main
from .output import show_progress


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("prism-demo"), show_default=True,
              help="Where engines, the performance map, plots and the summary go.")
@click.option("--quick", is_flag=True, help="Fewer batches and bandwidths (what CI runs).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (the report goes to stderr).")
def demo(out, quick, as_json):
    """Run the whole pipeline here: build, testbed, profile, fit, plot, serve --mode auto, requests.

    Uses the shared MNIST ViT when ../shared/data/mnist (or PRISM_TRT_DATA) is present, else
    vit_tiny_patch16_224 with random weights. Network namespaces shape the links when run as
    root with ip/tc, else ranks use loopback. Everything is torn down at the end, on Ctrl-C or on
    failure.
    """
    from ..workflows.demo import main_demo

    sys.exit(main_demo(out, quick, as_json, show_progress()))
