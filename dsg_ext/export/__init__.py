"""Deployment: a quantized model as a standard ONNX QDQ file (``export_onnx``)."""

from .qdq import deploy_module, export_onnx

__all__ = ["deploy_module", "export_onnx"]
