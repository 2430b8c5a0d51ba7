"""Deployment: ONNX export with standard operators only (:mod:`ddfnet.export.onnx`)."""
from .onnx import (STANDARD_DOMAINS, OnnxRuntimeModel, check_output_path, ddf_standard_ops, export_onnx,
                   onnx_translation_table, onnxruntime_relative_error)

__all__ = ['export_onnx', 'check_output_path', 'ddf_standard_ops', 'onnx_translation_table', 'OnnxRuntimeModel',
           'onnxruntime_relative_error', 'STANDARD_DOMAINS']
