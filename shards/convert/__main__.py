"""``python -m shards.convert``: see the package docstring."""
from shards.convert import cli

cli()
