"""Calibration data: text or token ids in, N seeded samples of L tokens out.

The protocol is Wanda's and SparseGPT's: join the texts, tokenise once with the model's own
tokenizer, cut the stream into windows of L tokens and draw N of them with a seeded
generator. Windows do not overlap, so the samples are distinct sequences (the debiased
statistics of the scorer assume that), and the optional held-out split (LayerIF's validation
set) never shares a window with the calibration samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_JOIN = "\n\n"  # documents are joined as paragraphs before tokenising, as wikitext is


@dataclass
class CalibrationData:
    """Token ids ready for the scorer.

    Attributes:
        input_ids: calibration samples, ``(N, L)`` int64.
        held_out: held-out samples ``(M, L)`` (LayerIF's validation split) or None.
        data_hash: sha256 of the ids of both splits, for provenance in scores.json.
        tokens_available: tokens in the whole joined stream the samples were cut from.
    """

    input_ids: torch.LongTensor  # (N, L)
    held_out: torch.LongTensor | None  # (M, L)
    data_hash: str
    tokens_available: int

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def load_texts(source: str | os.PathLike | Sequence[str], *, text_field: str = "text") -> list[str]:
    """Read calibration texts from a .txt file, a .jsonl file or a list of strings.

    Args:
        source: a ``.txt`` path (the whole file is one text), a ``.jsonl`` path (one JSON
            object per line, the text under ``text_field``), or a list of strings.
        text_field: the JSON Lines field that holds the text.

    Returns:
        The texts, in file order, empty ones dropped.

    Example:
        >>> load_texts(["first document", "", "second"])
        ['first document', 'second']
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such calibration file; hint: check --data")
        try:
            if path.suffix == ".jsonl":
                texts = _read_jsonl(path, text_field)
            elif path.suffix == ".txt":
                texts = [path.read_text(encoding="utf-8")]
            else:
                raise ValueError(f"{path}: calibration data must be a .txt or .jsonl file; hint: pass one to --data")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path}: not UTF-8 text (byte {exc.start}); hint: re-encode it (iconv -t UTF-8)"
                " and pass the new file to --data"
            ) from None
    else:
        texts = list(source)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"calibration texts: item {bad} is {type(texts[bad]).__name__}, not str")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{_describe(source)}: no calibration text found; hint: pass a file with text to --data")
    return texts


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); fix the line or pass another file to --data"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{lineno}: no {text_field!r} field (found {keys});"
                    " hint: choose the field with --text-field"
                )
            value = record[text_field]
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{lineno}: field {text_field!r} is not a string; hint: choose the field with --text-field"
                )
            texts.append(value)
    return texts


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "calibration texts"


def _is_pretokenized(source: Any) -> bool:
    if isinstance(source, torch.Tensor):
        return True
    if isinstance(source, (str, os.PathLike)) or not isinstance(source, Sequence) or not source:
        return False
    first = source[0]
    return isinstance(first, Sequence) and not isinstance(first, str)


def _token_stream(source: Any, tokenizer: Any, text_field: str) -> torch.Tensor:
    """The whole calibration set as one 1-D int64 stream of token ids."""
    if _is_pretokenized(source):
        if isinstance(source, torch.Tensor):
            if source.dtype.is_floating_point or source.is_complex() or source.ndim not in (1, 2):
                raise ValueError("pre-tokenized data must be an integer tensor of shape (N, L) or (T,)")
            return source.detach().to("cpu", torch.int64).reshape(-1)
        try:
            return torch.tensor([int(t) for seq in source for t in seq], dtype=torch.int64)
        except (TypeError, ValueError):
            raise ValueError("pre-tokenized data must be a list of lists of ints") from None
    texts = load_texts(source, text_field=text_field)
    if tokenizer is None:
        raise ValueError(
            "text calibration data needs the model's tokenizer (the model folder has none);"
            " hint: pass pre-tokenized ids instead"
        )
    ids = tokenizer(_JOIN.join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _hash(*tensors: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        digest.update(f"{tuple(t.shape)}".encode())
        digest.update(t.contiguous().numpy().astype("<i8").tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def calibration_data(
    source: Any,
    tokenizer: Any = None,
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    held_out: int = 0,
    allow_fewer: bool = False,
    text_field: str = "text",
) -> CalibrationData:
    """Tokenise, join and cut calibration data into N seeded samples of L tokens.

    Args:
        source: a .txt or .jsonl path, a list of strings, pre-tokenized ids (an int tensor
            ``(N, L)`` or a list of lists of ints; no tokenizer needed), or a
            :class:`CalibrationData`, returned unchanged.
        tokenizer: the model's tokenizer (any callable returning ``{"input_ids": [...]}``).
        num_samples: N, calibration sequences.
        seq_len: L, tokens per sequence.
        seed: seeds the choice of windows; same inputs and seed give the same samples.
        held_out: M, extra windows for a held-out split (LayerIF), disjoint from the N.
        allow_fewer: when the stream holds fewer than (N + M) windows, keep the M held-out
            windows and take as many calibration samples as remain instead of failing.
        text_field: JSON Lines field holding the text.

    Returns:
        The samples, the held-out split, their hash and the stream length.

    Raises:
        ValueError: too few tokens (the message says how many there are), or bad input.

    Example:
        >>> data = calibration_data([[1, 2, 3, 4, 5, 6, 7, 8]], num_samples=2, seq_len=4)
        >>> data.input_ids.shape, data.tokens_available
        (torch.Size([2, 4]), 8)
    """
    if isinstance(source, CalibrationData):
        return source
    if num_samples < 1 or seq_len < 1 or held_out < 0:
        raise ValueError("num_samples and seq_len must be >= 1 and held_out >= 0")
    stream = _token_stream(source, tokenizer, text_field)  # (T,)
    total = int(stream.numel())
    windows = total // seq_len
    n = num_samples
    if windows < num_samples + held_out:
        need = (num_samples + held_out) * seq_len
        split = f" + {held_out} held-out" if held_out else ""
        message = (
            f"{_describe(source)}: calibration data has {total} tokens ({windows} windows of {seq_len});"
            f" {num_samples}{split} samples x {seq_len} tokens need {need}"
        )
        if not allow_fewer:
            raise ValueError(message + "; hint: add text, lower --samples or --seq-len, or pass --allow-fewer (score)")
        n = windows - held_out
        if n < 1:
            raise ValueError(message + "; not even one calibration sample is left; hint: lower --seq-len")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows, generator=generator)[: n + held_out]
    chunks = stream[: windows * seq_len].view(windows, seq_len)  # (windows, L)
    input_ids = chunks[order[:n]].clone()
    held = chunks[order[n:]].clone() if held_out else None
    log.debug("calibration: %d x %d tokens (+%d held out) drawn with seed %d from %d windows of %s",
              n, seq_len, held_out, seed, windows,
              source if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    return CalibrationData(
        input_ids=input_ids,
        held_out=held,
        data_hash=_hash(input_ids, held),
        tokens_available=total,
    )


def calibration_ids(data: Any) -> torch.Tensor | None:
    """Calibration ids ``(N, L)`` from CalibrationData, an int tensor or None."""
    if data is None:
        return None
    ids = getattr(data, "input_ids", data)
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.ndim != 2:
        raise ValueError(
            "data: expected CalibrationData or an integer tensor (N, L) of token ids;"
            " hint: cwca_export.data.calibration_data(texts, tokenizer, num_samples=N, seq_len=L)"
        )
    return ids.long()
