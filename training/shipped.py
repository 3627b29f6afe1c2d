"""The run configs and open_clip model JSONs shipped with the package, found from a checkout or an install.

``configs/`` is a package of its own (``configs/*.yaml``, ``configs/models/*.json`` as package data), so
``pip install .`` puts it beside ``training/``: :data:`ROOT` (the folder holding ``training/``) is the
checkout or the site-packages folder, and ``ROOT / "configs"`` is the shipped copy either way.

Rules (a path that exists as given, relative to the working directory, always wins):

- ``--config X``: ``X`` if it is a file; otherwise, for a relative ``X``, the shipped config
  ``configs/X``, with a leading ``configs/`` dropped and ``.yaml`` added unless X ends in .yaml/.yml, so
  ``retrieval_tiny``, ``retrieval_tiny.yaml`` and ``configs/retrieval_tiny.yaml`` all name
  ``<ROOT>/configs/retrieval_tiny.yaml``. Not found: a ConfigError naming every path tried and the
  shipped config names.
- ``model.model_config_dir``: the directory as given if it exists (or is absolute); otherwise a relative
  one under :data:`ROOT`, so the default ``configs/models`` is the shipped model JSONs when the working
  directory has no ``configs/models``.
"""
from __future__ import annotations

from pathlib import Path

from training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]  # the checkout, or site-packages (or a --target folder) of an install
CONFIGS = ROOT / "configs"
CONFIG_SUFFIXES = (".yaml", ".yml")


def shipped_configs() -> list[str]:
    """Names of the shipped run configs (``--config NAME``)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """The YAML file ``--config path`` means (see the module docstring for the rule).

    Raises:
        ConfigError: ``config file not found: ...``, naming each path tried and the shipped configs.
    """
    given = Path(path)
    if given.is_file():
        return given
    tried = [given]
    if not given.is_absolute() and given.parts:
        rel = Path(*given.parts[1:]) if given.parts[0] == "configs" and len(given.parts) > 1 else given
        candidate = CONFIGS / rel if rel.suffix in CONFIG_SUFFIXES else CONFIGS / rel.parent / f"{rel.name}.yaml"
        if candidate.is_file():
            return candidate
        if candidate not in tried:
            tried.append(candidate)
    names = ", ".join(shipped_configs()) or f"none ({CONFIGS} holds no *.yaml)"
    raise ConfigError(f"config file not found: {path} (tried {', '.join(str(p) for p in tried)}); "
                      f"shipped configs, usable by name: {names}")


def resolve_model_config_dir(config_dir: str | Path) -> Path:
    """The folder of open_clip model JSONs that ``model.model_config_dir`` means (see the module docstring)."""
    given = Path(config_dir)
    if given.is_dir() or given.is_absolute():
        return given
    shipped = ROOT / given
    return shipped if shipped.is_dir() else given
