"""The only place that adapts to the hardware (CPU-only torch) or to library versions."""

from __future__ import annotations

import importlib.metadata
import warnings

# megatron-core 0.16.1 builds every TransformerConfig with its deprecated default
# cuda_graph_scope and warns about it; nothing we set triggers it.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")

#: The megatron-core release every adaptation in this package was written and tested against.
MEGATRON_CORE_VERSION = "0.16.1"


def check_megatron_version() -> str:
    """Return the installed megatron-core version, warning when it is not the pinned one."""
    installed = importlib.metadata.version("megatron-core")
    if installed != MEGATRON_CORE_VERSION:
        warnings.warn(f"megatron-core {installed} is installed; remix-megatron is tested with "
                      f"{MEGATRON_CORE_VERSION} (pip install megatron-core=={MEGATRON_CORE_VERSION})", stacklevel=2)
    return installed
