"""Command-line entry points, each a module with ``main(argv)``: run as ``python launch/<tool>.py`` in a
checkout, or as the console script ``multiclip-<tool>`` of an install (``[project.scripts]`` in pyproject.toml)."""
