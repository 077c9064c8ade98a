"""Held-out perplexity with one protocol for torch models and ONNX Runtime artifacts.

The protocol (windows of ``seq_len`` tokens every ``stride`` tokens; in each window only the
tokens not scored by an earlier window count, the sliding-window recipe of the transformers
docs) lives in :func:`perplexity_from_logits`, which sees nothing but a function from token
ids to logits. Torch and ORT adapters supply that function, so their numbers are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cwca_export.progress import bar as progress_bar

LogitsFn = Callable[[np.ndarray], Any]  # (B, L) int64 ids -> (B, L, V) float logits (numpy or torch)

DEFAULT_CHUNK_TOKENS = 256  # positions per log-softmax: 256 x 128k vocabulary x 8 B = 256 MiB


class ShortEvaluationWarning(UserWarning):
    """The held-out text is shorter than one window: the number rests on one short window."""


@dataclass(frozen=True)
class Perplexity:
    """Result of one perplexity evaluation.

    Attributes:
        perplexity: exp(mean NLL) over the scored tokens.
        nll: mean negative log-likelihood per scored token (nats).
        tokens: tokens scored.
        windows: windows evaluated.
        seq_len, stride: the protocol.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position within the window) for every window."""
    out, prev_end = [], 0
    for start in range(0, max(n_tokens - 1, 1), stride):
        end = min(start + seq_len, n_tokens)
        if end - start < 2:
            break
        # position p predicts token p + 1: score targets in [prev_end, end)
        first_target = max(prev_end, start + 1)
        out.append((start, end, first_target - start - 1))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity_from_logits(
    logits_fn: LogitsFn,
    ids: np.ndarray,
    *,
    seq_len: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Perplexity:
    """Perplexity of a token stream under any model exposed as a logits function.

    Args:
        logits_fn: maps an int64 array (B, L) to logits (B, L, V): a numpy array or a torch
            tensor (read in place, on its device, in its dtype).
        ids: 1-D token stream.
        seq_len: window length.
        stride: step between windows (default ``seq_len``: non-overlapping windows).
        batch_size: windows per call (only full-length windows are batched together).
        max_tokens: evaluate only the first ``max_tokens`` tokens.
        progress: a bar over windows on stderr (shown on a terminal).
        chunk_tokens: positions whose log-softmax is taken at once (:func:`token_nll_sum`);
            bounds the NLL's extra memory to about ``chunk_tokens x V x 8`` bytes.

    Example:
        >>> uniform = lambda x: np.zeros((*x.shape, 10))
        >>> round(perplexity_from_logits(uniform, np.arange(100) % 10, seq_len=20).perplexity, 6)
        10.0
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise ValueError("seq_len must be >= 2 and stride in [1, seq_len]")
    if ids.size < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {ids.size}")
    windows = _windows(ids.size, seq_len, stride)
    total, count = 0.0, 0
    # group windows of equal length so they batch
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        by_len.setdefault(w[1] - w[0], []).append(w)
    windows_bar = progress_bar(total=len(windows), desc="eval", unit="window", show=progress)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = np.stack([ids[s:e] for s, e, _ in chunk])
            skips = [skip for _, _, skip in chunk]
            total += token_nll_sum(logits_fn(x), x, skips, chunk_tokens=chunk_tokens)
            count += sum(length - 1 - skip for skip in skips)
            windows_bar.update(len(chunk))
    windows_bar.close()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(windows), seq_len, stride)


def token_nll_sum(logits: Any, ids: np.ndarray, skips: Sequence[int] | None = None, *,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> float:
    """Summed next-token NLL (nats) of ``ids`` (B, L) under ``logits`` (B, L, V), in chunks.

    Row b scores targets ``ids[b, 1 + skips[b]:]`` (position p predicts token p + 1). The
    logits (numpy or torch, any float dtype, on any device) are read ``chunk_tokens``
    positions at a time: each chunk is cast to float64, its log-softmax taken and the target
    entries summed into a float64 scalar, so the extra memory is about
    ``chunk_tokens x V x 8`` bytes (times a small constant for temporaries) whatever B and L,
    never a float64 copy of the whole (B, L, V) array. The sum equals the naive float64
    computation up to the order of summation.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens {chunk_tokens}: must be >= 1")
    ids = np.asarray(ids, dtype=np.int64)
    rows, length = ids.shape
    skips = [0] * rows if skips is None else list(skips)
    if hasattr(logits, "detach"):  # a torch tensor: stay on its device
        return _torch_nll_sum(logits, ids, skips, chunk_tokens)
    total = 0.0
    for b in range(rows):
        for p0 in range(skips[b], length - 1, chunk_tokens):
            p1 = min(p0 + chunk_tokens, length - 1)
            part = np.asarray(logits[b, p0:p1], dtype=np.float64)  # (c, V): the only float64 copy
            m = part.max(axis=-1)
            lse = m + np.log(np.exp(part - m[:, None]).sum(axis=-1))
            picked = part[np.arange(p1 - p0), ids[b, p0 + 1 : p1 + 1]]
            total += float((lse - picked).sum())
    return total


def _torch_nll_sum(logits, ids: np.ndarray, skips: list[int], chunk_tokens: int) -> float:
    import torch

    with torch.no_grad():
        targets = torch.from_numpy(ids).to(logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        length = ids.shape[1]
        for b in range(ids.shape[0]):
            for p0 in range(skips[b], length - 1, chunk_tokens):
                p1 = min(p0 + chunk_tokens, length - 1)
                logp = torch.log_softmax(logits[b, p0:p1].double(), dim=-1)
                total -= logp.gather(-1, targets[b, p0 + 1 : p1 + 1, None]).sum()
        return float(total)


def torch_logits_fn(model, *, device: str | None = None) -> LogitsFn:
    """Adapter: a transformers causal LM (any device/dtype) as a logits function.

    The logits come back as the model's own tensor, on its device and in its dtype: no
    float32 or host copy of (B, L, V); :func:`token_nll_sum` reads them a chunk at a time.
    """
    import torch

    device = device or str(next(model.parameters()).device)

    @torch.no_grad()
    def fn(x: np.ndarray):
        return model(input_ids=torch.from_numpy(x).to(device), use_cache=False).logits

    return fn


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` (or ``cuda:N``) without
    that GPU is refused."""
    import torch

    kind, sep, index = device.partition(":")
    if device not in ("auto", "cpu", "cuda") and not (kind == "cuda" and sep and index.isdigit()):
        raise ValueError(f"--device {device!r}: pass --device cpu, --device cuda, --device cuda:N or --device auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible <= (int(index) if index else 0):
            raise ValueError(f"--device {device}: {visible} CUDA device(s) visible to torch; pass --device cpu")
    return device


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """The token stream of a text, without special tokens (the protocol's input)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def read_token_ids(data, tokenizer, *, text_field: str = "text", max_tokens: int | None = None) -> np.ndarray:
    """The held-out token stream of ``data``, read and tokenised in pieces
    (:func:`cwca_export.data.iter_token_ids`: the ids of one call over the whole joined text);
    with ``max_tokens`` reading stops once that many are held, so a large corpus costs only
    the part the evaluation uses."""
    from cwca_export.data import iter_text, iter_token_ids

    pieces = iter_text(data, text_field=text_field)
    runs = iter_token_ids(pieces, tokenizer)
    held: list[np.ndarray] = []
    count = 0
    try:
        for ids in runs:
            held.append(np.asarray(ids, dtype=np.int64))
            count += len(ids)
            if max_tokens is not None and count >= max_tokens:
                break
    finally:
        runs.close()
        pieces.close()  # closes the file or dataset behind it
    return np.concatenate(held) if held else np.zeros(0, dtype=np.int64)


def ort_logits_fn(artifact_dir: str, *, ep: str = "cpu", prepack: bool = True) -> LogitsFn:
    """Adapter: an exported artifact (``model.onnx`` with the decoder contract) in ONNX Runtime.

    Only the ``logits`` output is fetched (no KV-cache outputs), as ONNX Runtime returns it
    (no float32 re-copy when it already is float32). ``prepack=False`` (``eval --low-memory``)
    computes from the artifact's mapped weights instead of prepacked copies of them.
    """
    from pathlib import Path

    from cwca_export.exporter.session import DecoderSession, make_session

    try:
        session = make_session(Path(artifact_dir) / "model.onnx", ep, prepack=prepack)
    except (ValueError, OSError, ImportError):  # the tool's own refusals (--ep, a missing runtime)
        raise
    except Exception as exc:  # ONNX Runtime's load errors (no common base class): a damaged artifact
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{artifact_dir}: ONNX Runtime cannot load model.onnx ({detail}); the artifact is damaged or"
            " incomplete (a cut-short copy, a missing data file); hint: export it again with"
            " `cwca-export export ... --overwrite`, or copy it whole"
        ) from None
    decoder = DecoderSession(session)

    def fn(x: np.ndarray) -> np.ndarray:
        return decoder.session.run(["logits"], decoder.feed(x, np.ones_like(x), None))[0]

    return fn


def is_artifact(path) -> bool:
    """True for a folder written by ``cwca-export export`` (an ONNX artifact)."""
    from pathlib import Path

    return (Path(path) / "model.onnx").is_file()


def check_target(
    path: str, *, trust_remote_code: bool = False, allow_pickle: bool = False, seq_len: int | None = None
) -> None:
    """Refuse what :func:`evaluate` cannot honestly measure, before any text is read.

    A model folder passes :func:`~cwca_export.loading.check_model_folder`; an artifact's
    tokenizer code and its model's positions are checked the same way.
    """
    from pathlib import Path

    from cwca_export.loading import (
        check_lengths,
        check_model_folder,
        check_remote_code,
        read_config,
    )

    lengths = {"--seq-len": seq_len}
    if is_artifact(path):
        check_remote_code(path, trust_remote_code)
        if (Path(path) / "config.json").is_file():
            check_lengths(read_config(path), path, lengths)
    else:
        check_model_folder(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, lengths=lengths)


def evaluate(
    path: str,
    data: str,
    *,
    seq_len: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    ep: str = "cpu",
    device: str = "auto",
    text_field: str = "text",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    low_memory: bool = False,
) -> dict:
    """Held-out perplexity of a model folder (torch) or an ONNX artifact (ONNX Runtime).

    Both go through :func:`perplexity_from_logits` on the same token stream, so a dense
    export's number matches its torch model's to the export's numerical tolerance. For an
    artifact, the measured memory and latency from its manifest are returned beside.
    ``progress`` shows a bar over windows on stderr (on a terminal).
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) places a torch model; an artifact runs on ``ep``.
    Peak memory beyond the weights: one batch's logits (batch x seq_len x V in the model's
    dtype) plus ``chunk_tokens x V x 8`` bytes for the NLL (docs/memory.md). ``low_memory``
    (artifacts only): the session runs without prepacking, its weights the artifact's mapped
    file pages rather than the process's own memory (same numbers to float round-off).

    Example:
        >>> evaluate("out/artifact", "heldout.txt", seq_len=256)["perplexity"]  # doctest: +SKIP
    """
    import warnings
    from pathlib import Path

    from cwca_export.loading import load_tokenizer

    check_target(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, seq_len=seq_len)
    if low_memory and not is_artifact(path):
        raise ValueError(f"--low-memory: {path} is a model folder, and it applies to ONNX artifacts"
                         " (a session without prepacking); hint: drop --low-memory")
    if is_artifact(path) and device not in ("auto", "cpu"):  # it would run on --ep, saying nothing
        raise ValueError(f"--device {device}: {path} is an ONNX artifact, which runs on --ep; hint: pass"
                         " --ep cuda for ONNX Runtime's CUDA provider and drop --device")
    if not is_artifact(path) and ep != "cpu":
        raise ValueError(f"--ep {ep}: {path} is a torch model folder, placed by --device; hint: pass"
                         f" --device {'cuda' if ep == 'cuda' else 'cpu'} and drop --ep")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer (tokenizer.json) to read {data} with; save one beside the model")
    ids = read_token_ids(data, tokenizer, text_field=text_field, max_tokens=max_tokens)
    available = ids.size if max_tokens is None else min(ids.size, max_tokens)
    if available < 2:  # one token predicts nothing: no window can be scored
        raise ValueError(f"{data}: {available} token(s), and a perplexity needs at least 2; hint: pass more text"
                         " to --data" + (" or a larger --max-tokens" if max_tokens is not None else ""))
    if available < seq_len:
        warnings.warn(
            f"{data}: only {available} tokens, fewer than one window of --seq-len {seq_len}; the perplexity"
            " rests on one short window (pass more text to --data or a smaller --seq-len)",
            ShortEvaluationWarning,
            stacklevel=2,
        )
    report: dict = {"path": str(path), "data": str(data)}
    if is_artifact(path):
        logits_fn = ort_logits_fn(path, ep=ep, prepack=not low_memory)
        from cwca_export.exporter.session import casts_float16_per_run

        lean = ", no prepacking" if low_memory else ""
        if casts_float16_per_run(Path(path) / "model.onnx", ep, not low_memory):
            lean += ", float16 weights cast per forward"
        report["runtime"] = f"onnxruntime ({ep}{lean})"
        if (Path(path) / "cwca_manifest.json").is_file():
            from cwca_export.exporter.api import Artifact

            artifact = Artifact.load(path)
            report["measured"] = {
                "disk_bytes": artifact.disk_bytes,
                "resident_bytes": artifact.resident_bytes,
                "latency_ms": artifact.latency_ms,
            }
    else:
        from cwca_export.loading import load_model

        target = resolve_device(device)
        model, _ = load_model(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        model.to(target).eval()
        logits_fn = torch_logits_fn(model, device=target)
        report["runtime"] = "torch" if target == "cpu" else f"torch ({target})"
    result = perplexity_from_logits(
        logits_fn, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, max_tokens=max_tokens,
        progress=progress, chunk_tokens=chunk_tokens,
    )
    report.update(result.to_dict())
    return report
