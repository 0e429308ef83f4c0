"""Export targets (ONNX float / int8 QDQ, TFLite float / full-integer int8) and their manifests.

:func:`ghnq_deploy.export.pipeline.export` is the entry point; docs/export.md explains the
route, the file names and the measured numbers.
"""
