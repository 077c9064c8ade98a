"""Versions of the libraries that shaped a result, read from package metadata (no imports)."""

from __future__ import annotations

import platform
from importlib import metadata

_TRACKED = (
    "cwca-export",
    "numpy",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "accelerate",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the stack, for provenance in scores, plans and manifests."""
    found = {"python": platform.python_version()}
    for name in _TRACKED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
