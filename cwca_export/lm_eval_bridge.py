"""Optional: lm-evaluation-harness tasks on a torch model folder (the ``eval`` extra).

Install with ``pip install -c constraints.txt 'cwca-export[eval]'``. lm-eval loads its task
data through Hugging Face ``datasets``; with the data on disk, set ``HF_DATASETS_OFFLINE=1``
(and ``HF_HUB_OFFLINE=1``) and point the tasks at it: a task YAML of your own whose
``dataset_path`` / ``dataset_kwargs.data_files`` name local files, in a folder passed as
``include_path``. Nothing in cwca-export's own tests needs lm-eval.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install -c constraints.txt 'cwca-export[eval]'"


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"hellaswag, arc_easy"`` or a list -> ``["hellaswag", "arc_easy"]``.

    Example:
        >>> parse_tasks("hellaswag, arc_easy,")
        ['hellaswag', 'arc_easy']
    """
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t and t.strip()]
    if not names:
        raise ValueError("lm-eval tasks: none given; hint: --lm-eval-tasks hellaswag,arc_easy")
    return names


def import_lm_eval() -> Any:
    """The ``lm_eval`` module, or an ImportError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(f"lm-eval-harness is not installed; hint: {INSTALL_HINT}") from None
    return lm_eval


def run_lm_eval(
    path: str | os.PathLike,
    tasks: str | Sequence[str],
    *,
    batch_size: int | str = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    device: str | None = None,
    include_path: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Run lm-eval-harness ``tasks`` on a Hugging Face model folder (torch).

    Args:
        path: a model folder (``config.json`` and weights), e.g. the ``--out`` of
            ``cwca-export compress``. ONNX artifacts are refused: lm-eval's ``hf`` model
            runs torch.
        tasks: task names, a list or a comma-separated string.
        batch_size, limit, num_fewshot, device: passed to ``lm_eval.simple_evaluate``.
        include_path: a folder of your own task YAMLs (e.g. tasks reading local files).
        trust_remote_code: allow the folder's own modelling code (never asked on stdin).

    Returns:
        ``{"path", "tasks", "results", "groups", "versions", "n-shot"}``, JSON-ready.

    Example:
        >>> run_lm_eval("small", "hellaswag", limit=100)["results"]  # doctest: +SKIP
    """
    from cwca_export.evaluate import is_artifact
    from cwca_export.loading import is_compressed_folder

    path = Path(path)
    names = parse_tasks(tasks)
    if is_artifact(path):
        raise ValueError(
            f"{path}: lm-eval-harness tasks run on torch model folders, not ONNX artifacts;"
            " hint: pass the folder the artifact was exported from (e.g. the --out of"
            " `cwca-export compress`), or use `cwca-export eval ARTIFACT --data TEXT` for perplexity"
        )
    from cwca_export.loading import check_model_folder

    check_model_folder(path, trust_remote_code=trust_remote_code)  # lm-eval reads safetensors only
    lm_eval = import_lm_eval()
    kwargs: dict[str, Any] = {"tasks": names, "batch_size": batch_size, "log_samples": False}
    if is_compressed_folder(path):
        # per-block shapes differ from the config's, so lm-eval's own from_pretrained cannot
        # rebuild the model: load it here and hand lm-eval the model object
        from lm_eval.models.huggingface import HFLM

        from cwca_export.loading import load_model

        model, tokenizer = load_model(path, trust_remote_code=trust_remote_code)
        kwargs["model"] = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    else:
        kwargs.update(model="hf", model_args=f"pretrained={path},trust_remote_code={trust_remote_code}")
    if limit is not None:
        kwargs["limit"] = limit
    if num_fewshot is not None:
        kwargs["num_fewshot"] = num_fewshot
    if device is not None:
        kwargs["device"] = device
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        kwargs["task_manager"] = TaskManager(include_path=str(include_path))
    results = lm_eval.simple_evaluate(**kwargs)
    if results is None:  # a non-zero rank of a distributed run
        return {"path": str(path), "tasks": names, "results": None}
    keep = {k: results.get(k) for k in ("results", "groups", "versions", "n-shot")}
    # lm-eval's numbers include NumPy scalars and sets: make them plain JSON
    return {"path": str(path), "tasks": names, **json.loads(json.dumps(keep, default=_plain))}


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
