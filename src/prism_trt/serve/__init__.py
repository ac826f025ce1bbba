"""HTTP inference server: KServe v2 / Open Inference Protocol (JSON and Triton's binary tensor
extension), dynamic batching, Prometheus metrics, bounded reads."""

from .app import create_app, default_max_body_bytes, default_max_image_bytes
from .batcher import Batcher, BatchOutcome
from .http_server import HttpLimits, check_exposure, serve, server_config
from .metrics import ServerMetrics
from .protocol import decode_image, max_image_pixels, parse_infer_request
from .request_error import RequestError

__all__ = ["Batcher", "BatchOutcome", "HttpLimits", "RequestError", "ServerMetrics", "check_exposure", "create_app",
           "decode_image", "default_max_body_bytes", "default_max_image_bytes", "max_image_pixels",
           "parse_infer_request", "serve", "server_config"]
