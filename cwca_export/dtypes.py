"""The weight dtypes the tool accepts, by one set of names on every verb (``--dtype``).

Kept free of torch at import time so that budgets and the CLI can name dtypes without loading it.
"""

from __future__ import annotations

from typing import Any

# the one spelling of ``--dtype`` on every verb
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: Any) -> Any:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a torch dtype) to a torch dtype."""
    import torch

    table = {name: getattr(torch, name) for name in DTYPE_NAMES}
    if isinstance(dtype, torch.dtype):
        if dtype not in table.values():
            raise ValueError(f"dtype {dtype}: choose one of {sorted(table)}")
        return dtype
    try:
        return table[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(table)}") from None
