"""Files every artifact carries next to ``model.onnx``: config, generation config, tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_side_files(model: Any, tokenizer: Any, out_dir: Path) -> list[Path]:
    """Write ``config.json``, ``generation_config.json`` (if any) and the tokenizer files."""
    before = set(out_dir.iterdir())
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return sorted(set(out_dir.iterdir()) - before)
