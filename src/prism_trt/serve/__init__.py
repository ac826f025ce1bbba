"""HTTP inference server: KServe v2 / Open Inference Protocol (JSON and Triton's binary tensor
extension), dynamic batching, Prometheus metrics, bounded reads."""

from .app import create_app, default_max_body_bytes, default_max_image_bytes
from .batcher import Batcher, BatchOutcome
from .http_server import HttpLimits, check_exposure, serve, server_config
from .kserve import KServeRequest, ServedModality
from .metrics import ServerMetrics
from .protocol import VisionServing, decode_image, max_image_pixels
from .request_error import RequestError
from .text_protocol import TextServing

__all__ = ["Batcher", "BatchOutcome", "HttpLimits", "KServeRequest", "RequestError", "ServedModality", "ServerMetrics",
           "TextServing", "VisionServing", "check_exposure", "create_app", "decode_image", "default_max_body_bytes",
           "default_max_image_bytes", "max_image_pixels", "serve", "server_config"]
