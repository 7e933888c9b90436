"""Model tools: prepare, cut, convert, quantize, dequantize and compare TFLite extractors (``python -m tools.model``)."""
