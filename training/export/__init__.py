"""ONNX export of trained runs (training side: imports torch). ``graph`` describes what a head exports,
``exporter`` writes and checks the files; see :func:`training.export.exporter.export_run`."""
