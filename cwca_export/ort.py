"""The one place that imports ONNX Runtime, after checking that exactly one flavour is installed."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata
from types import ModuleType

_FLAVOURS = ("onnxruntime", "onnxruntime-gpu")


def installed_flavours() -> list[str]:
    """The ONNX Runtime distributions present in this environment."""
    found = []
    for name in _FLAVOURS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


@lru_cache(maxsize=1)
def require_onnxruntime() -> ModuleType:
    """Import onnxruntime, or raise ImportError that says how to fix the environment."""
    flavours = installed_flavours()
    if len(flavours) > 1:
        raise ImportError(
            "both onnxruntime and onnxruntime-gpu are installed and shadow each other; hint:"
            " pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'cwca-export[cpu]'"
            " (or '[gpu]')"
        )
    if not flavours:
        raise ImportError("ONNX Runtime is not installed; hint: pip install 'cwca-export[cpu]' (or '[gpu]')")
    import onnxruntime

    return onnxruntime
