"""Prometheus text exposition (format 0.0.4), written by hand so the server needs no client library.

Only what the server uses is here: counters, gauges and histograms with labels. Every update and
the rendering take one lock, so the batch worker (event loop) and a scrape never see a half-updated
histogram.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# |predicted - measured| / measured of a learning selector's per-sample latency
PREDICTION_ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{name}="{escape_label_value(value)}"' for name, value in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str], lock: threading.Lock):
        self.name, self.help_text, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = lock

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {escape_help(self.help_text)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Family):
    kind = "counter"

    def __init__(self, *args):
        super().__init__(*args)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0  # a label-less counter exists from the start, at 0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up, got increment {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_label_text(self.labelnames, key)} {format_value(value)}"
                for key, value in sorted(self._values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str], lock: threading.Lock,
                 buckets: Iterable[float]):
        super().__init__(name, help_text, labelnames, lock)
        self.buckets = tuple(sorted(set(float(b) for b in buckets)))
        if not self.buckets:
            raise ValueError(f"{self.name} needs at least one bucket bound")
        # per label set: per-bucket (non-cumulative) counts with a last slot for +Inf, sum, count
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not self.labelnames:  # a label-less histogram exists from the start, empty
            self._series[()] = ([0] * (len(self.buckets) + 1), [0.0])

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        slot = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[slot] += 1
            total[0] += value

    def snapshot(self, **labels: str) -> tuple[list[int], float, int]:
        """(cumulative counts per bound incl. +Inf, sum, count) for one label set."""
        with self._lock:
            counts, total = self._series.get(self._key(labels), ([0] * (len(self.buckets) + 1), [0.0]))
            cumulative, running = [], 0
            for count in counts:
                running += count
                cumulative.append(running)
            return cumulative, total[0], running

    def samples(self) -> list[str]:
        lines = []
        for key, (counts, total) in sorted(self._series.items()):
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                running += count
                labels = _label_text(self.labelnames, key, ("le", format_value(bound)))
                lines.append(f"{self.name}_bucket{labels} {running}")
            plain = _label_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{plain} {format_value(total[0])}")
            lines.append(f"{self.name}_count{plain} {running}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: list[_Family] = []

    def _add(self, family: _Family) -> _Family:
        if any(existing.name == family.name for existing in self._families):
            raise ValueError(f"metric {family.name} is registered twice")
        self._families.append(family)
        return family

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labelnames, self._lock))

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labelnames, self._lock))

    def histogram(self, name: str, help_text: str, buckets: Iterable[float], labelnames: Sequence[str] = ()
                  ) -> Histogram:
        return self._add(Histogram(name, help_text, labelnames, self._lock, buckets))

    def render(self) -> str:
        with self._lock:
            lines = []
            for family in self._families:
                lines += family.header() + family.samples()
        return "\n".join(lines) + "\n"


def batch_size_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself: full batches get their own bucket."""
    bounds, size = [], 1
    while size < max_batch:
        bounds.append(size)
        size *= 2
    return [*bounds, max_batch]


class ServerMetrics:
    """The server's metric families, named ``prism_*``."""

    def __init__(self, max_batch: int):
        self.registry = Registry()
        r = self.registry
        self.requests = r.counter("prism_requests_total", "HTTP requests answered, by endpoint and status code.",
                                  ("endpoint", "code"))
        self.errors = r.counter("prism_request_errors_total",
                                "Requests answered with an error, by endpoint, status code and reason.",
                                ("endpoint", "code", "reason"))
        self.latency = r.histogram("prism_inference_latency_seconds",
                                   "Wall time of successful inference requests from arrival to answer, by mode run.",
                                   LATENCY_BUCKETS_S, ("mode",))
        self.batch_size = r.histogram("prism_batch_size", "Images per batch handed to the executor.",
                                      batch_size_buckets(max_batch))
        self.batch_requests = r.histogram("prism_batch_requests", "Requests merged into one executor batch.",
                                          batch_size_buckets(max_batch))
        self.chosen = r.counter("prism_mode_chosen_total", "Batches per mode the selector chose.", ("mode",))
        self.fallbacks = r.counter("prism_fallbacks_total",
                                   "Batches a distributed mode failed on and the local chain answered.")
        self.isolations = r.counter("prism_batch_isolations_total",
                                    "Merged batches that failed and were rerun one request at a time.")
        self.executor_seconds = r.histogram("prism_executor_seconds", "Executor time per batch, by mode run.",
                                            LATENCY_BUCKETS_S, ("mode",))
        self.queue_depth = r.gauge("prism_queue_depth", "Requests waiting for a batch.")
        self.queue_images = r.gauge("prism_queue_images", "Images waiting for a batch.")
        # what a learning selector (serve --mode auto) made of each batch; absent for a fixed mode
        self.prediction_error = r.histogram(
            "prism_prediction_error_ratio", "Per batch, |predicted - measured| / measured per-sample latency of the "
            "mode that ran, as the selector predicted it when choosing; by mode.", PREDICTION_ERROR_BUCKETS, ("mode",))
        self.last_prediction_error = r.gauge("prism_prediction_error_last_ratio",
                                             "The newest batch's prediction error, by mode.", ("mode",))
        self.explored = r.counter("prism_explored_batches_total",
                                  "Batches the selector ran on a mode other than its predicted best, to explore.",
                                  ("mode",))
        self.bandwidth_estimate = r.gauge("prism_bandwidth_estimate_mbit",
                                          "The selector's live link-rate estimate, Mbit/s "
                                          "(the performance map's scale).")
        self.observer_errors = r.counter("prism_selector_observe_errors_total",
                                         "Batches whose results the selector failed to learn from (answered anyway).")

    def render(self) -> str:
        return self.registry.render()
