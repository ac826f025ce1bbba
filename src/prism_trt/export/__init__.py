"""Exporting a model's stages to ONNX, verifying them and building engines (`prism-trt build`)."""

from .build import Builder, BuildResult, StageReport, config_plans
from .onnx_export import ExportError, check_onnx, export_stage, resolve_exporter
from .stages import example_feed, monolithic_stage, rank_stages
from .verify import VerificationError, verify_engine, verify_onnx

__all__ = ["Builder", "BuildResult", "StageReport", "config_plans", "ExportError", "check_onnx", "export_stage",
           "resolve_exporter", "example_feed", "monolithic_stage", "rank_stages", "VerificationError",
           "verify_engine", "verify_onnx"]
