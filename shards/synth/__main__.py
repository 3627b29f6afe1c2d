"""``python -m shards.synth``: see the package docstring."""
from shards.synth import main

main()
