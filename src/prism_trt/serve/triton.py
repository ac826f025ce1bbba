"""Triton's model extensions, as Triton's own tools read them (tritonclient's ``get_model_config``,
``get_inference_statistics`` and ``get_model_repository_index``; perf_analyzer and model-analyzer
read the configuration):

* model configuration (``GET /v2/models/NAME/config``): Triton's ``ModelConfig`` as JSON, with the
  inputs and outputs the model metadata lists (dims without the batch axis) and the batcher's
  settings as ``dynamic_batching``;
* statistics (``GET /v2/models[/NAME]/stats``): counts and cumulative nanoseconds, read from the
  server's Prometheus families (serve/metrics.py), so /metrics and the statistics never disagree;
* the repository index (``POST /v2/repository/index``): the one model this server serves.

A server serves one model, at one version, ``kserve.MODEL_VERSION``.
"""

from __future__ import annotations

from .kserve import MODEL_VERSION
from .metrics import ServerMetrics, sample_sum

# the endpoints whose requests the statistics count (the metrics' endpoint label)
INFER_ENDPOINTS = ("infer", "infer_image")


def data_type(datatype: str) -> str:
    """An OIP tensor datatype ("FP32", "UINT8", "BYTES") as a Triton config data type ("TYPE_FP32")."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def tensor_config(tensor: dict) -> dict:
    """A metadata tensor ({name, datatype, shape with the batch axis first}) as a config entry: dims
    without the batch axis; one value per item is dims [1] reshaped to [], as Triton writes it."""
    dims = tensor["shape"][1:]
    entry = {"name": tensor["name"], "data_type": data_type(tensor["datatype"]), "dims": dims or [1]}
    if not dims:
        entry["reshape"] = {"shape": []}
    return entry


def model_config(metadata: dict, max_batch: int, max_wait_s: float, max_queue_images: int) -> dict:
    """The model configuration of the model ``metadata`` describes, batched up to ``max_batch``
    by a batcher that waits at most ``max_wait_s`` for company and holds ``max_queue_images``."""
    parameters = {key: value for key, value in metadata.get("parameters", {}).items() if key != "max_batch_size"}
    parameters["max_queue_images"] = max_queue_images
    return {
        "name": metadata["name"],
        "platform": metadata["platform"],
        "backend": metadata["platform"],
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch,
        "input": [tensor_config(tensor) for tensor in metadata["inputs"]],
        "output": [tensor_config(tensor) for tensor in metadata["outputs"]],
        # batches fill to max_batch or until the oldest request waited max_wait_s, first come first served
        "dynamic_batching": {"preferred_batch_size": [max_batch],
                             "max_queue_delay_microseconds": round(max_wait_s * 1e6),
                             "preserve_ordering": True},
        "parameters": {key: {"string_value": str(value)} for key, value in parameters.items()},
    }


def _duration(count: float, seconds: float) -> dict:
    return {"count": int(count), "ns": round(seconds * 1e9)}


def _timed(metric, **labels) -> dict:
    """A histogram's or summary's count and cumulative duration over the label sets holding ``labels``."""
    return _duration(sample_sum(metric, "_count", **labels), sample_sum(metric, "_sum", **labels))


def _failed_requests(metrics: ServerMetrics) -> int:
    """Inference requests answered 5xx: the server failed them (a 4xx is the client's mistake)."""
    return int(sum(sample.value for family in metrics.errors.collect() for sample in family.samples
                   if sample.name == "prism_request_errors_total" and sample.labels["endpoint"] in INFER_ENDPOINTS
                   and sample.labels["code"].startswith("5")))


def model_statistics(name: str, metrics: ServerMetrics) -> dict:
    """One model's entry of the statistics response, since the server started.

    success and queue count requests (their time from arrival to answer, and waiting for their
    batch); compute_infer counts executor batches and their time. The executor's time holds the
    copies of the batch in and of the logits out, so compute_input and compute_output count the
    same batches with no time of their own. Failures are counted, not timed."""
    batches = sample_sum(metrics.batch_size, "_count")
    by_size: dict[int, dict[str, float]] = {}  # batch size -> {"_count": batches, "_sum": executor seconds}
    for family in metrics.batch_executor_seconds.collect():
        for sample in family.samples:
            suffix = sample.name.removeprefix(family.name)
            if suffix in ("_count", "_sum"):
                by_size.setdefault(int(sample.labels["batch_size"]), {})[suffix] = sample.value
    return {
        "name": name,
        "version": MODEL_VERSION,
        "last_inference": round(sample_sum(metrics.last_inference) * 1e3),  # ms since the epoch
        "inference_count": int(sample_sum(metrics.batch_size, "_sum")),  # items, not requests
        "execution_count": int(batches),
        "inference_stats": {
            "success": _timed(metrics.latency),
            "fail": _duration(_failed_requests(metrics), 0.0),
            "queue": _timed(metrics.queue_seconds),
            "compute_input": _duration(batches, 0.0),
            "compute_infer": _timed(metrics.executor_seconds),
            "compute_output": _duration(batches, 0.0),
            "cache_hit": _duration(0, 0.0),  # there is no response cache
            "cache_miss": _duration(0, 0.0),
        },
        "batch_stats": [{"batch_size": size, "compute_input": _duration(sums["_count"], 0.0),
                         "compute_infer": _duration(sums["_count"], sums["_sum"]),
                         "compute_output": _duration(sums["_count"], 0.0)} for size, sums in sorted(by_size.items())],
    }


def repository_index(name: str, ready: bool, reason: str | None, only_ready: bool) -> list[dict]:
    """The repository index: the served model, READY or UNAVAILABLE (with why); ``only_ready``
    (the request's ``"ready": true``) leaves out a model that is not ready."""
    if only_ready and not ready:
        return []
    entry = {"name": name, "version": MODEL_VERSION, "state": "READY" if ready else "UNAVAILABLE"}
    if reason:
        entry["reason"] = reason
    return [entry]
