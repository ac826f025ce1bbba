"""The server's Prometheus metrics, through ``prometheus_client``: one registry per server (never
the library's global one, so two apps in a process, as in the tests, count apart), scraped as the
text exposition format 0.0.4.

The same families answer Triton's statistics extension (serve/triton.py): /metrics and
``GET /v2/models/NAME/stats`` show the same counts and durations.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# |predicted - measured| / measured of a learning selector's per-sample latency
PREDICTION_ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def batch_size_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself: full batches get their own bucket."""
    bounds, size = [], 1
    while size < max_batch:
        bounds.append(size)
        size *= 2
    return [*bounds, max_batch]


def sample_sum(metric: Counter | Gauge | Histogram | Summary, suffix: str = "", **labels: str) -> float:
    """The sum of ``metric``'s samples named with ``suffix`` ("" for a counter's total or a gauge,
    "_count" / "_sum" of a histogram or summary) over every label set holding ``labels``: with
    all of the metric's labels given, that one series' value; 0 for a series never touched."""
    total = 0.0
    for family in metric.collect():
        name = family.name + (suffix or ("_total" if family.type == "counter" else ""))
        total += sum(sample.value for sample in family.samples
                     if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
    return total


class _Scraped:
    """The registry as /metrics shows it. prometheus_client adds a ``_created`` timestamp series to
    every counter, histogram and summary, which the 0.0.4 text format can only write as extra gauge
    families; scrapers and dashboards read rates, not these, so the exposition leaves them out."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():  # fresh objects on every collect: filtering them is safe
            family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield family


class ServerMetrics:
    """The server's metric families, named ``prism_*``, in a registry of their own."""

    def __init__(self, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("prism_requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "code"), registry=r)
        self.errors = Counter("prism_request_errors_total",
                              "Requests answered with an error, by endpoint, status code and reason.",
                              ("endpoint", "code", "reason"), registry=r)
        self.latency = Histogram("prism_inference_latency_seconds",
                                 "Wall time of successful inference requests from arrival to answer, by mode run.",
                                 ("mode",), registry=r, buckets=LATENCY_BUCKETS_S)
        self.batch_size = Histogram("prism_batch_size", "Images per batch handed to the executor.",
                                    registry=r, buckets=batch_size_buckets(max_batch))
        self.batch_requests = Histogram("prism_batch_requests", "Requests merged into one executor batch.",
                                        registry=r, buckets=batch_size_buckets(max_batch))
        self.chosen = Counter("prism_mode_chosen_total", "Batches per mode the selector chose.", ("mode",),
                              registry=r)
        self.fallbacks = Counter("prism_fallbacks_total",
                                 "Batches a distributed mode failed on and the local chain answered.", registry=r)
        self.isolations = Counter("prism_batch_isolations_total",
                                  "Merged batches that failed and were rerun one request at a time.", registry=r)
        self.executor_seconds = Histogram("prism_executor_seconds", "Executor time per batch, by mode run.",
                                          ("mode",), registry=r, buckets=LATENCY_BUCKETS_S)
        self.queue_depth = Gauge("prism_queue_depth", "Requests waiting for a batch.", registry=r)
        self.queue_images = Gauge("prism_queue_images", "Images waiting for a batch.", registry=r)
        # what Triton's statistics extension reports beyond the families above
        self.queue_seconds = Histogram("prism_queue_seconds",
                                       "Time successful inference requests waited for their batch to start.",
                                       registry=r, buckets=LATENCY_BUCKETS_S)
        self.batch_executor_seconds = Summary("prism_batch_executor_seconds",
                                              "Executor time per batch, by images in the batch.", ("batch_size",),
                                              registry=r)
        self.last_inference = Gauge("prism_last_inference_timestamp_seconds",
                                    "Unix time the newest batch was answered (0: none yet).", registry=r)
        # what a learning selector (serve --mode auto) made of each batch; absent for a fixed mode
        self.prediction_error = Histogram(
            "prism_prediction_error_ratio", "Per batch, |predicted - measured| / measured per-sample latency of the "
            "mode that ran, as the selector predicted it when choosing; by mode.", ("mode",), registry=r,
            buckets=PREDICTION_ERROR_BUCKETS)
        self.last_prediction_error = Gauge("prism_prediction_error_last_ratio",
                                           "The newest batch's prediction error, by mode.", ("mode",), registry=r)
        self.explored = Counter("prism_explored_batches_total",
                                "Batches the selector ran on a mode other than its predicted best, to explore.",
                                ("mode",), registry=r)
        self.bandwidth_estimate = Gauge("prism_bandwidth_estimate_mbit",
                                        "The selector's live link-rate estimate, Mbit/s (the performance map's scale).",
                                        registry=r)
        self.observer_errors = Counter("prism_selector_observe_errors_total",
                                       "Batches whose results the selector failed to learn from (answered anyway).",
                                       registry=r)
        self._scraped = _Scraped(r)

    def render(self) -> str:
        return generate_latest(self._scraped).decode()
