"""multiclip training library: backbone, task heads, config, trainer, export."""
from shards.torchvision_compat import install as _install_torchvision_compat

_install_torchvision_compat()
