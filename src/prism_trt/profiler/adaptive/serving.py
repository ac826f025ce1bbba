"""How a server chooses the chain of each batch, from its options: one fixed chain, or ``auto``
from a performance map, refined online or not. The `serve` command states the options, reads
and checks the map with :func:`load_map` before rank 0 joins the group, then calls
:func:`make_selector`; the server only sees the selector it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...core.chain_key import Mode
from ...engines.manifest import Manifest, rank_directory
from ...engines.perfmap import PerfMap
from ...errors import UsageError
from ...runtime.api import Executor, FixedSelector
from .online import OnlineOptions
from .selector import LiveSelector, MapSelector, OnlineSelector

SERVE_MODES = (*(mode.value for mode in Mode), "auto")  # auto: chosen per batch from a map


@dataclass(frozen=True)
class SelectorOptions:
    """``mode``: a fixed chain (local, voltage, prism at ``cr``) or auto: chosen per batch from the
    map at ``map_path`` for ``objective``, never a CR below ``min_agreement``; ``online`` refines
    the map's predictions with every served batch (``online_options``) and, with ``save_map``,
    writes the refined map every ``save_every`` batches."""

    mode: str = "local"
    cr: float | None = None
    map_path: Path | None = None
    objective: str = "latency"
    min_agreement: float = 0.99
    online: bool = True
    online_options: OnlineOptions = field(default_factory=OnlineOptions)
    save_map: Path | None = None
    save_every: int = 50

    def check(self) -> None:
        """Options that do not fit together, refused before anything is loaded."""
        if self.mode not in SERVE_MODES:
            raise UsageError(f"mode must be one of {', '.join(SERVE_MODES)}, got {self.mode!r}")
        if self.mode == "auto" and self.map_path is None:
            raise UsageError("--mode auto needs --map PERFMAP.json (make one with `prism-trt profile`)")
        if self.save_map is not None and not (self.mode == "auto" and self.online):
            raise UsageError("--save-map needs --mode auto with online refinement (not --no-online)")
        if self.mode == "auto" and self.online and self.objective == "energy":
            raise UsageError("online refinement learns latency only; add --no-online to serve --objective energy")


def load_map(options: SelectorOptions, engines: Path) -> MapSelector | None:
    """``--mode auto``'s map, read and checked against rank 0's engines in ``engines`` without
    joining any group: it must load, be bound to these engines and measure only chains they hold.
    A bad map is refused in a second, not after the workers' join timeout. None for a fixed mode."""
    options.check()
    if options.mode != "auto":
        return None
    data = PerfMap.load(options.map_path, engines_dir=engines)
    built = Manifest.read(rank_directory(engines, 0)).keys()
    missing = [key.label for key in data.chains() if key not in built]
    if missing:
        raise UsageError(f"the performance map {options.map_path} measured chains these engines do not hold: "
                         f"{', '.join(missing)} (built: {', '.join(key.label for key in built)}); re-run "
                         f"`prism-trt profile` for {engines}")
    if not data.points:
        raise UsageError(f"the performance map {options.map_path} has no measured points; run `prism-trt profile` "
                         f"to fill it")
    return MapSelector(data, options.objective, options.min_agreement)


def make_selector(options: SelectorOptions, executor: Executor, engines: Path, chooser: MapSelector | None = None):
    """The selector ``options`` ask for, over ``executor`` (whose build is ``engines``): a chain
    or a map these engines cannot serve is refused here, at start-up. ``chooser``: the map
    :func:`load_map` already read and checked (read here otherwise)."""
    options.check()
    if options.mode != "auto":
        return FixedSelector(executor.key_for(options.mode, options.cr))
    chooser = chooser or load_map(options, engines)
    if not options.online:
        return LiveSelector(chooser, executor)
    return OnlineSelector(chooser, executor, options.online_options, save_path=options.save_map,
                          save_every=options.save_every if options.save_map else 0)
