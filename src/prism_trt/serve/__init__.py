"""HTTP inference server: KServe v2 / Open Inference Protocol, dynamic batching, Prometheus metrics."""

from .app import create_app, default_max_body_bytes, serve
from .batcher import Batcher, BatchOutcome
from .metrics import ServerMetrics
from .protocol import RequestError, decode_image, parse_infer_request

__all__ = ["Batcher", "BatchOutcome", "RequestError", "ServerMetrics", "create_app", "decode_image",
           "default_max_body_bytes", "parse_infer_request", "serve"]
