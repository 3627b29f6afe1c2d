"""The shipped run configs (``*.yaml``) and open_clip model JSONs (``models/*.json``), installed as package
data so an installed multiclip finds them outside a checkout: ``multiclip-train --config retrieval_tiny``.
How a name or path is resolved: ``training/shipped.py``."""
