"""Calibration data: text or token ids in, N seeded samples of L tokens out.

The protocol is Wanda's and SparseGPT's: join the texts, tokenise them with the model's own
tokenizer, cut the stream into windows of L tokens and draw N of them with a seeded
generator. Windows do not overlap, so the samples are distinct sequences (the debiased
statistics of the scorer assume that), and the optional held-out split (LayerIF's validation
set) never shares a window with the calibration samples.

Streaming: text is read and tokenised in pieces of about :data:`CHUNK_CHARS` characters, and
reading stops once the stream holds ``max(max_tokens, (N + M) L)`` tokens (``max_tokens``
defaults to :data:`POOL_TOKENS`), so memory is bounded by that pool, never by the corpus.
The windows are drawn from the tokens read, exactly as from the whole stream before: on a
corpus of at most the pool the samples are the ones one whole-corpus tokenisation gave.
Pieces are cut at whitespace where the text tokenises the same split as whole (checked on
both sides of every cut), so the ids equal those of one call over the whole text; where no
such cut exists (a tokenizer that marks every call's start, or text without whitespace) the
piece grows until one does.

Inputs: a ``.txt`` file, a ``.jsonl`` file (one object per line), a list of strings,
pre-tokenized ids, or a folder written by ``datasets``' ``save_to_disk`` (the optional
``datasets`` extra; one split: a ``DatasetDict``'s split folder ``DIR/train``), its rows read
one batch at a time from the memory-mapped Arrow files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_JOIN = "\n\n"  # documents are joined as paragraphs before tokenising, as wikitext is
CHUNK_CHARS = 1 << 18  # characters read and tokenised per step
POOL_TOKENS = 1 << 24  # default tokens read at most (more only when N + M windows need more)
_CUT_MARGIN = 1024  # a cut sits at least this many characters before the end of the text read
_CUT_CONTEXT = 512  # characters each side of a cut that must tokenise the same split and whole
_CUT_TRIES = 16  # whitespace positions tried per step before reading more
_WHITESPACE_RUN = re.compile(r"(?<=\S)\s")  # a whitespace run's first character
_DATASET_ROWS = 256  # rows read from a datasets folder at a time


class ShortCalibrationError(ValueError):
    """The text holds fewer windows than the samples asked need. Its hint names the flags every
    verb that reads calibration text has (``--samples``, ``--seq-len``); a caller that spells the
    fix otherwise (score's ``--allow-fewer``, a recipe's keys) re-raises it :meth:`with_hint`."""

    def __init__(self, problem: str, hint: str, *, windows: int, tokens: int, held_out: int = 0) -> None:
        super().__init__(f"{problem}; hint: {hint}")
        self.problem, self.windows, self.tokens, self.held_out = problem, windows, tokens, held_out

    def with_hint(self, hint: str) -> ShortCalibrationError:
        """The same error with another hint."""
        return ShortCalibrationError(self.problem, hint, windows=self.windows, tokens=self.tokens,
                                     held_out=self.held_out)


@dataclass
class CalibrationData:
    """Token ids ready for the scorer.

    Attributes:
        input_ids: calibration samples, ``(N, L)`` int64.
        held_out: held-out samples ``(M, L)`` (LayerIF's validation split) or None.
        data_hash: sha256 of the ids of both splits, for provenance in scores.json.
        tokens_available: tokens read, the samples cut from them: the whole joined stream,
            or the first ``max(max_tokens, (N + M) L)`` or so where reading stopped early.
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

    def calibration_only(self) -> CalibrationData:
        """These samples without the held-out split, hashed as if drawn without one (the
        calibration windows do not depend on it: :func:`calibration_data`)."""
        return replace(self, held_out=None, data_hash=_hash(self.input_ids, None))


def load_texts(source: str | os.PathLike | Sequence[str], *, text_field: str = "text") -> list[str]:
    """Read all calibration texts from a .txt file, a .jsonl file, a datasets folder or a list.

    :func:`calibration_data` streams instead (:func:`iter_text`); this reads everything,
    for callers that need the whole text.

    Args:
        source: a ``.txt`` path (the whole file is one text), a ``.jsonl`` path (one JSON
            object per line, the text under ``text_field``), a ``datasets`` ``save_to_disk``
            folder (the ``text_field`` column) or a list of strings.
        text_field: the JSON Lines field or dataset column that holds the text.

    Returns:
        The texts, in file order, empty ones dropped.

    Example:
        >>> load_texts(["first document", "", "second"])
        ['first document', 'second']
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        texts = list(iter_dataset_texts(source, text_field=text_field))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such calibration file; hint: check --data")
        try:
            if path.suffix.lower() == ".jsonl":
                texts = list(_iter_jsonl(path, text_field))
            elif path.suffix.lower() == ".txt":
                texts = [path.read_text(encoding="utf-8-sig")]
            else:
                raise ValueError(
                    f"{path}: calibration data must be a .txt or .jsonl file or a datasets folder;"
                    " hint: pass one to --data")
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


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    try:
        yield from _iter_jsonl_records(path, text_field)
    except UnicodeDecodeError:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {_first_bad_byte(path)}); hint: re-encode it (iconv -t UTF-8)"
            " and pass the new file to --data"
        ) from None


def _iter_jsonl_records(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8-sig") as fh:
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
            yield value


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "calibration texts"


def _is_pretokenized(source: Any) -> bool:
    if isinstance(source, torch.Tensor):
        return True
    if isinstance(source, (str, os.PathLike)) or not isinstance(source, Sequence) or not source:
        return False
    first = source[0]
    return isinstance(first, Sequence) and not isinstance(first, str)


def _pretokenized_stream(source: Any) -> torch.Tensor:
    """Pre-tokenized ids as one 1-D int64 stream."""
    if isinstance(source, torch.Tensor):
        if source.dtype.is_floating_point or source.is_complex() or source.ndim not in (1, 2):
            raise ValueError("pre-tokenized data must be an integer tensor of shape (N, L) or (T,)")
        return source.detach().to("cpu", torch.int64).reshape(-1)
    try:
        return torch.tensor([int(t) for seq in source for t in seq], dtype=torch.int64)
    except (TypeError, ValueError):
        raise ValueError("pre-tokenized data must be a list of lists of ints") from None


def iter_text(
    source: str | os.PathLike | Sequence[str], *, text_field: str = "text", chunk_chars: int = CHUNK_CHARS
) -> Iterator[str]:
    """The joined calibration text in pieces, read lazily: what ``"\\n\\n".join(load_texts(...))`` holds.

    Args:
        source: a ``.txt`` path (read ``chunk_chars`` characters at a time), a ``.jsonl`` path
            (one record at a time), a ``datasets`` ``save_to_disk`` folder (``text_field`` is
            the column; rows a batch at a time) or a list of strings.
        text_field: the JSON Lines field or dataset column that holds the text.
        chunk_chars: characters per piece of a ``.txt`` file.

    Raises:
        ValueError / FileNotFoundError: as :func:`load_texts`, when the first piece is asked for
            (bad records when they are reached); no text at all once the source is exhausted.

    Example:
        >>> "".join(iter_text(["first document", "", "second"]))
        'first document\\n\\nsecond'
    """
    found = False
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        documents: Iterable[str] = iter_dataset_texts(source, text_field=text_field)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such calibration file; hint: check --data")
        if path.suffix.lower() == ".txt":
            yield from _iter_txt(path, chunk_chars)
            return
        if path.suffix.lower() != ".jsonl":
            raise ValueError(
                f"{path}: calibration data must be a .txt or .jsonl file or a datasets folder;"
                " hint: pass one to --data")
        documents = _iter_jsonl(path, text_field)
    else:
        documents = source
    for i, text in enumerate(documents):
        if not isinstance(text, str):
            raise ValueError(f"calibration texts: item {i} is {type(text).__name__}, not str")
        if not text.strip():
            continue
        if found:
            yield _JOIN
        found = True
        yield text
    if not found:
        raise ValueError(f"{_describe(source)}: no calibration text found; hint: pass a file with text to --data")


def _iter_txt(path: Path, chunk_chars: int) -> Iterator[str]:
    found = False
    try:
        with path.open(encoding="utf-8-sig") as fh:  # text mode: newlines as read_text gives them
            while piece := fh.read(chunk_chars):
                found = found or bool(piece.strip())
                yield piece
    except UnicodeDecodeError:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {_first_bad_byte(path)}); hint: re-encode it (iconv -t UTF-8)"
            " and pass the new file to --data"
        ) from None
    if not found:
        raise ValueError(f"{path}: no calibration text found; hint: pass a file with text to --data")


def _first_bad_byte(path: Path) -> int:
    """Offset of the first byte that is not UTF-8, read a block at a time."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return offset - pending + exc.start
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return offset - len(exc.object) + exc.start
    return offset


def iter_dataset_texts(folder: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` column of a ``datasets`` ``save_to_disk`` folder, row by row.

    Only local folders: ``datasets.load_from_disk`` memory-maps the Arrow files and rows are
    read ``_DATASET_ROWS`` at a time, so the dataset is never held in memory; the Hub is never
    asked (``HF_DATASETS_OFFLINE=1``). A ``DatasetDict`` folder names its splits: pass one
    split's folder (``DIR/train``).

    Raises:
        ValueError: ``datasets`` not installed, not a dataset folder, a dict of splits, no
            such column, or a value that is not a string.
    """
    path = Path(folder)
    if not any((path / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json")):
        raise ValueError(
            f"{path}: a folder, but not one written by datasets' save_to_disk;"
            " hint: pass a .txt or .jsonl file or a saved dataset to --data")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path}: reading a datasets folder needs the datasets package;"
            " hint: pip install 'cwca-export[datasets]' or pass a .txt or .jsonl file to --data") from None
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise ValueError(
            f"{path}: a dataset with splits {splits}; hint: pass one split's folder, e.g."
            f" --data {path / (splits[0] if splits else 'train')}")
    if _saved_without_rows(path):  # datasets' own reader fails on it with an IndexError
        return
    try:
        dataset = datasets.load_from_disk(str(path), keep_in_memory=False)
    except Exception as exc:  # a broken or foreign folder: datasets raises many kinds
        raise ValueError(
            f"{path}: not readable as a datasets save_to_disk folder ({type(exc).__name__}: {exc});"
            " hint: pass a .txt or .jsonl file or a folder written by Dataset.save_to_disk to --data") from None
    if text_field not in dataset.column_names:
        raise ValueError(
            f"{path}: no {text_field!r} column (found {sorted(dataset.column_names)});"
            " hint: choose the column with --text-field")
    column = dataset.select_columns([text_field]).with_format(None)  # python objects, whatever format it was saved in
    for start in range(0, len(column), _DATASET_ROWS):
        rows = column[start : start + _DATASET_ROWS][text_field]
        for i, value in enumerate(rows):
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"{path}: row {start + i}: column {text_field!r} is {type(value).__name__}, not a string;"
                    " hint: choose the column with --text-field")
            yield value or ""


def _saved_without_rows(path: Path) -> bool:
    """Whether ``state.json`` lists no Arrow files (a zero-row ``Dataset.save_to_disk``)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _clean_cut(tokenizer: Any, text: str, limit: int) -> int | None:
    """The last whitespace position at or before ``limit`` where ``text`` tokenises the same
    split as whole (checked on ``_CUT_CONTEXT`` characters each side), or None when none of
    the last ``_CUT_TRIES`` is."""
    candidates = [m.start() for m in _WHITESPACE_RUN.finditer(text, max(1, limit - 64 * _CUT_CONTEXT), limit + 1)]
    for cut in reversed(candidates[-_CUT_TRIES:]):
        left, right = text[max(0, cut - _CUT_CONTEXT) : cut], text[cut : cut + _CUT_CONTEXT]
        if _encode(tokenizer, left) + _encode(tokenizer, right) == _encode(tokenizer, left + right):
            return cut
    return None


def iter_token_ids(pieces: Iterable[str], tokenizer: Any, *, chunk_chars: int = CHUNK_CHARS) -> Iterator[list[int]]:
    """Token ids of the concatenated ``pieces`` in runs, equal to one call over the whole text.

    The text is read ``chunk_chars`` characters at a time (long documents too) and tokenised
    in runs of at most about twice that, each cut at whitespace near the end of what is held,
    where the text tokenises the same split as whole; where no such cut is found the run
    grows (correct ids, memory then grows with the run). Stop iterating and nothing more is
    read.

    Example:
        >>> tok = lambda text, **_: {"input_ids": [ord(c) for c in text]}
        >>> [len(ids) for ids in iter_token_ids(["ab " * 3000], tok, chunk_chars=4096)]
        [7166, 1834]
    """
    held: list[str] = []
    size = 0
    next_try = chunk_chars + _CUT_MARGIN
    for piece in pieces:
        for start in range(0, len(piece), chunk_chars):  # a long document is cut too
            held.append(piece[start : start + chunk_chars])
            size += len(held[-1])
            if size < next_try:
                continue
            text = "".join(held)
            cut = _clean_cut(tokenizer, text, len(text) - _CUT_MARGIN)
            if cut is None:  # read on: try again one chunk later, near the new end
                held, next_try = [text], size + chunk_chars
                continue
            yield _encode(tokenizer, text[:cut])
            held, size = [text[cut:]], len(text) - cut
            next_try = chunk_chars + _CUT_MARGIN
    text = "".join(held)
    if text:
        yield _encode(tokenizer, text)


def _read_tokens(source: Any, tokenizer: Any, text_field: str, limit: int) -> tuple[torch.Tensor, int]:
    """Tokenise ``source`` until ``limit`` tokens are read: ``(int32 stream (T,), T)``."""
    if tokenizer is None:
        raise ValueError(
            "text calibration data needs the model's tokenizer (the model folder has none);"
            " hint: pass pre-tokenized ids instead"
        )
    runs: list[torch.Tensor] = []
    count = 0
    pieces = iter_text(source, text_field=text_field, chunk_chars=CHUNK_CHARS)
    ids_runs = iter_token_ids(pieces, tokenizer, chunk_chars=CHUNK_CHARS)
    try:
        for ids in ids_runs:
            runs.append(torch.tensor(ids, dtype=torch.int32))
            count += len(ids)
            if count >= limit:
                break
    finally:
        ids_runs.close()
        pieces.close()  # closes the file or dataset behind it
    stream = torch.cat(runs) if runs else torch.zeros(0, dtype=torch.int32)
    return stream, count


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
    max_tokens: int | None = None,
) -> CalibrationData:
    """Tokenise, join and cut calibration data into N seeded samples of L tokens.

    Args:
        source: a .txt or .jsonl path, a ``datasets`` ``save_to_disk`` folder (one split),
            a list of strings, pre-tokenized ids (an int tensor ``(N, L)`` or a list of lists
            of ints; no tokenizer needed), or a :class:`CalibrationData`, returned unchanged.
        tokenizer: the model's tokenizer (any callable returning ``{"input_ids": [...]}``).
        num_samples: N, calibration sequences.
        seq_len: L, tokens per sequence.
        seed: seeds the choice of windows; same inputs and seed give the same samples.
        held_out: M, extra windows for a held-out split (LayerIF), disjoint from the N.
        allow_fewer: when the stream holds fewer than (N + M) windows, keep the M held-out
            windows and take as many calibration samples as remain instead of failing.
        text_field: JSON Lines field (or dataset column) holding the text.
        max_tokens: text is read and tokenised until the stream holds
            ``max(max_tokens, (N + M) L)`` tokens (default :data:`POOL_TOKENS`), and the
            windows are drawn from those; a shorter corpus is read whole, and gives the
            samples one whole-corpus tokenisation gives.

    Returns:
        The samples, the held-out split, their hash and the tokens read.

    Raises:
        ShortCalibrationError: too few tokens (the message says how many there are).
        ValueError: bad input.

    Example:
        >>> data = calibration_data([[1, 2, 3, 4, 5, 6, 7, 8]], num_samples=2, seq_len=4)
        >>> data.input_ids.shape, data.tokens_available
        (torch.Size([2, 4]), 8)
    """
    if isinstance(source, CalibrationData):
        return source
    if num_samples < 1 or seq_len < 1 or held_out < 0:
        raise ValueError("num_samples and seq_len must be >= 1 and held_out >= 0")
    pool = max((max_tokens if max_tokens is not None else POOL_TOKENS) // seq_len, num_samples + held_out)
    if _is_pretokenized(source):
        stream = _pretokenized_stream(source)  # (T,)
        total = int(stream.numel())
    else:
        stream, total = _read_tokens(source, tokenizer, text_field, pool * seq_len)  # (T,) int32
    windows = min(total // seq_len, pool)
    n = num_samples
    if windows < num_samples + held_out:
        need = (num_samples + held_out) * seq_len
        split = f" + {held_out} held-out" if held_out else ""
        message = (
            f"{_describe(source)}: calibration data has {total} tokens ({windows} windows of {seq_len});"
            f" {num_samples}{split} samples x {seq_len} tokens need {need}"
        )
        if not allow_fewer:
            fit = f" (at most {windows - held_out} fit)" if windows > held_out else ""
            raise ShortCalibrationError(message, f"add text, or lower --samples{fit} or --seq-len", windows=windows,
                                        tokens=total, held_out=held_out)
        n = windows - held_out
        if n < 1:
            raise ValueError(message + "; not even one calibration sample is left; hint: lower --seq-len")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows, generator=generator)[: n + held_out]
    chunks = stream[: windows * seq_len].view(windows, seq_len)  # (windows, L)
    input_ids = chunks[order[:n]].to(torch.int64)
    held = chunks[order[n:]].to(torch.int64) if held_out else None
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
