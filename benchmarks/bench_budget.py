"""Budgets and peers: what a user's other options reach at each byte budget, side by side.

On the shipped model (``cwca_export/assets/demo-llama``) this builds, from the dense fp32
export (``cwca-export export MODEL --out DIR``), every peer a user would try, and measures each
in the same run with the same settings:

- dense fp32, dense int8 (``--quantize int8``), dense int4 (``--quantize int4``: the tool's
  MatMulNBits, symmetric, block 32);
- ONNX Runtime's ``MatMulNBitsQuantizer``: RTN (``DefaultWeightOnlyQuantConfig``, asymmetric),
  HQQ and GPTQ (calibration windows from ``--calib-data``; ORT ships the GPTQ code it calls),
  at block 32 and 128, with and without the embedding. The optimum export ties lm_head to the
  embedding through a Transpose, so its MatMul has no constant weight and stays fp32;
  "+emb" unties it (a transposed copy of the embedding as lm_head's own initializer, which
  the quantizer then turns into MatMulNBits) and quantizes the embedding Gather into
  GatherBlockQuantized with RTN (HQQ and GPTQ in ORT do not quantize Gather);
- NNCF ``compress_weights`` on the dense ONNX graph: INT4_ASYM with INT8_ASYM backup, group 64
  (group 128 does not divide the 192-wide hidden size; NNCF refuses it) at the smallest ratio
  that meets each budget (searched; data-free and data-aware Hessian sensitivity), AWQ and scale
  estimation on and off at ratio 1, INT4_SYM, and all_layers. The tied lm_head MatMul is in
  the ignored scope. NNCF writes MatMulNBits zero points one per byte, which ONNX Runtime 1.31
  refuses; they are packed two per byte (low nibble first, ORT's layout) after compression.

Columns: held-out perplexity by ``cwca-export eval ARTIFACT --data HELDOUT --json`` (all
held-out tokens unless ``--quick`` / ``--max-tokens``), bytes of the graph and its external data,
peak resident memory and prefill / decode p50 latency (``measure_runtime``, one
``MeasureConfig`` for every row), and the budgets each row fits: bytes <= x * dense fp32 graph
bytes, and decode p50 <= ``--latency-x`` * dense fp32 decode p50 measured in this run.

The tool's own budget-search artifacts (``benchmarks/bench_budget_search.py`` builds them) join
as rows with ``--artifact NAME=DIR``: evaluated and measured in the same run and rounds as the
peers, so their latencies compare side by side.

Usage:
    python benchmarks/bench_budget.py --quick                  # 4,096 held-out tokens
    python benchmarks/bench_budget.py --out benchmarks/results/bench_budget.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "cwca_export" / "assets" / "demo-llama"
HELDOUT = ROOT / "cwca_export" / "assets" / "text" / "heldout.txt"
TRAIN = ROOT / "cwca_export" / "assets" / "text" / "train.txt"
BUDGETS = (0.30, 0.20, 0.15, 0.12, 0.10)
LM_HEAD = "/lm_head/MatMul"
EMBED_GATHER = "/model/embed_tokens/Gather"
# files an artifact folder needs besides model.onnx (the eval reads the tokenizer from it); the
# manifest is not copied: it would describe the dense graph, not the peer's
FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
NNCF_GROUP = 64
MEASURED = ("rounds", "resident_bytes", "prefill_p50_ms", "decode_p50_ms", "decode_p90_ms")
PRIORITY = (
    "dense fp32",
    "dense int8",
    "dense int4",
    "NNCF int4a g64 r1.00 AWQ+SE",
    "NNCF int4s",
    "ORT RTN int4 b32 +emb",
    "ORT RTN int4 b128 +emb",
    "ORT GPTQ int4 b32 +emb",
    "NNCF int4a g64 r1.00",
    "ORT GPTQ int4 b128 +emb",
    "ORT HQQ int4 b32 +emb",
    "ORT HQQ int4 b128 +emb",
    "NNCF int4a g64 r0",
    "ORT RTN",
    "ORT GPTQ",
    "ORT HQQ",
)


# ---------------------------------------------------------------- helpers


def run_cli(*args: str) -> str:
    """``cwca-export ARGS`` in a subprocess (this checkout's code); stdout, or raise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "cwca_export", *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError(
            f"cwca-export {args[0]} failed: {lines[-1] if lines else proc.returncode}"
        )
    return proc.stdout


def write_artifact(model: Any, dense_dir: Path, out: Path) -> Path:
    """``out/model.onnx`` (self-contained, like the dense export) and the dense tokenizer files."""
    import onnx

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in FOLDER_FILES:
        if (dense_dir / name).is_file():
            shutil.copy2(dense_dir / name, out / name)
    if model.ByteSize() < 2**31 - 2**20:
        onnx.save_model(model, str(out / "model.onnx"))
    else:
        onnx.save_model(
            model,
            str(out / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx_data",
            size_threshold=1024,
        )
    return out / "model.onnx"


def untie_lm_head(model: Any) -> Any:
    """Give ``/lm_head/MatMul`` its own initializer: the embedding, transposed (no Transpose).

    The optimum export feeds lm_head from ``Transpose(model.embed_tokens.weight)``; a weight
    quantizer only rewrites MatMuls whose weight is a constant initializer, so tied, lm_head
    stays fp32 whatever the quantizer does.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    head = next(n for n in graph.node if n.name == LM_HEAD)
    weight = head.input[1]
    if any(i.name == weight for i in graph.initializer):
        return model  # already untied
    producer = next(n for n in graph.node if weight in n.output)
    if producer.op_type != "Transpose":
        raise ValueError(
            f"{LM_HEAD} weight comes from {producer.op_type}, expected the tied Transpose"
        )
    source = next(i for i in graph.initializer if i.name == producer.input[0])
    array = numpy_helper.to_array(source)
    perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), None)
    transposed = np.ascontiguousarray(array.transpose(perm) if perm else array.T)
    graph.initializer.append(numpy_helper.from_array(transposed, "lm_head.weight"))
    head.input[1] = "lm_head.weight"
    if not any(weight in n.input for n in graph.node):
        graph.node.remove(producer)
    onnx.checker.check_model(model)
    return model


def calibration_feeds(
    dense_onnx: Path, texts: Path, samples: int, seq_len: int
) -> list[dict[str, np.ndarray]]:
    """``samples`` windows of ``seq_len`` tokens from ``texts``, as the dense graph's inputs."""
    from transformers import AutoTokenizer

    from cwca_export.evaluate import tokenize_text
    from cwca_export.exporter.session import DecoderSession, make_session

    tokenizer = AutoTokenizer.from_pretrained(dense_onnx.parent, local_files_only=True)
    text = texts.read_text(encoding="utf-8")[: samples * seq_len * 12]
    ids = tokenize_text(tokenizer, text)
    if ids.size < samples * seq_len:
        raise ValueError(f"{texts}: {ids.size} tokens, need {samples * seq_len}")
    decoder = DecoderSession(make_session(dense_onnx, "cpu"))
    feeds = []
    for i in range(samples):
        window = ids[i * seq_len : (i + 1) * seq_len][None, :]
        feeds.append(decoder.feed(window, np.ones_like(window), None))
    return feeds


# ---------------------------------------------------------------- builders (ONNX ModelProto out)


def ort_int4(
    dense_onnx: Path, algo: str, block: int, embed: bool, feeds: list[dict[str, np.ndarray]] | None
) -> tuple[Any, dict[str, Any]]:
    """ORT's MatMulNBitsQuantizer: RTN, HQQ or GPTQ; ``embed``: untied lm_head, quantized Gather."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, items: list[dict[str, np.ndarray]]):
            self.items = items
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(self.items):
                return None
            self.index += 1
            return self.items[self.index - 1]

    model = onnx.load(str(dense_onnx))
    if embed:
        model = untie_lm_head(model)
    if algo == "rtn":
        ops = ("MatMul", "Gather") if embed else ("MatMul",)
        config: Any = DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=False, op_types_to_quantize=ops
        )
    elif algo == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block, op_types_to_quantize=("MatMul",))
    elif algo == "gptq":
        if feeds is None:
            raise ValueError("gptq needs calibration feeds")
        config = GPTQWeightOnlyQuantConfig(
            calibration_data_reader=Reader(feeds), op_types_to_quantize=("MatMul",)
        )
    else:
        raise ValueError(algo)
    quantizer = MatMulNBitsQuantizer(
        model, block_size=block, is_symmetric=False, algo_config=config
    )
    quantizer.process()
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    notes: dict[str, Any] = {
        "lm_head": "untied, MatMulNBits" if embed else "tied, fp32 (Transpose of the embedding)"
    }
    if embed and algo != "rtn":
        # HQQ and GPTQ leave Gather alone: a second, RTN pass quantizes only the embedding
        second = MatMulNBitsQuantizer(
            out,
            block_size=block,
            is_symmetric=False,
            algo_config=DefaultWeightOnlyQuantConfig(
                block_size=block, is_symmetric=False, op_types_to_quantize=("Gather",)
            ),
        )
        second.process()
        out = second.model.model
        notes["embedding"] = (
            "RTN GatherBlockQuantized (second pass; ORT's HQQ/GPTQ do not quantize Gather)"
        )
    elif embed:
        notes["embedding"] = "RTN GatherBlockQuantized"
    else:
        notes["embedding"] = "fp32 Gather"
    return out, notes


def pack_nbits_zero_points(model: Any) -> int:
    """Pack MatMulNBits 4-bit zero points from one per byte (N, blocks) to two (N, ceil(blocks/2)).

    ONNX Runtime 1.31 checks zero_points against shape [N * ceil(blocks / 2)] or
    [N, ceil(blocks / 2)] and refuses NNCF's (N, blocks); element 2j goes in the low nibble
    of byte j and 2j+1 in the high nibble (ORT's ``MlasQuantizeBlockwise`` layout). Returns the
    number of initializers packed.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    packed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[3]:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("bits", 4) != 4:
            continue
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        blocks = -(-k // block)
        init = inits[node.input[3]]
        zp = numpy_helper.to_array(init)
        if zp.dtype != np.uint8 or zp.size != n * blocks:
            continue  # already packed (or float zero points)
        zp = zp.reshape(n, blocks)
        if zp.max() > 15:
            raise ValueError(f"{init.name}: zero point {zp.max()} does not fit 4 bits")
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        both = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(both), init.name))
        packed += 1
    return packed


def nncf_compress(
    dense_onnx: Path,
    *,
    ratio: float | None,
    mode: str = "INT4_ASYM",
    group: int = NNCF_GROUP,
    dataset: list[dict[str, np.ndarray]] | None = None,
    hessian: bool = False,
    awq: bool = False,
    scale_estimation: bool = False,
    all_layers: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """NNCF ``compress_weights`` on the dense ONNX graph, its zero points then packed for ORT."""
    import logging

    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = onnx.load(str(dense_onnx))
    notes: dict[str, Any] = {"lm_head": "tied, ignored scope (consumes the dequantized embedding)"}
    ignored: list[str] = [LM_HEAD]
    if all_layers:
        # with all_layers NNCF rewrites the embedding initializer for the Gather only and leaves
        # the tied Transpose reading a name that is gone; untied, lm_head is compressed as well
        model = untie_lm_head(model)
        ignored = []
        notes["lm_head"] = "untied, compressed (all_layers)"
    kwargs: dict[str, Any] = {}
    if mode.startswith("INT8"):
        ratio, group = None, None  # one precision: no ratio, per-channel, no backup
    else:
        kwargs["backup_mode"] = nncf.BackupMode.INT8_ASYM
    if dataset is not None:
        kwargs["dataset"] = nncf.Dataset(dataset)
        kwargs["subset_size"] = len(dataset)
        kwargs["sensitivity_metric"] = (
            nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION
            if hessian
            else nncf.SensitivityMetric.WEIGHT_QUANTIZATION_ERROR
        )
    if awq:
        kwargs["awq"] = True
    if scale_estimation:
        kwargs["scale_estimation"] = True
    out = nncf.compress_weights(
        model,
        mode=getattr(nncf.CompressWeightsMode, mode),
        ratio=ratio,
        group_size=group,
        ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
        all_layers=all_layers or None,
        **kwargs,
    )
    for node in out.graph.node:
        if node.op_type == "MatMulNBits" and "input_ids" in node.input:
            raise ValueError(
                f"NNCF {nncf.__version__} made the embedding Gather a MatMulNBits over input_ids"
                f" ({node.name}): ONNX Runtime rejects the graph"
            )
    notes["zero_points_packed"] = pack_nbits_zero_points(out)
    return out, notes


# ---------------------------------------------------------------- measurement


def graph_bytes(model_onnx: Path) -> int:
    from cwca_export.exporter.postprocess import graph_bytes as _graph_bytes

    return _graph_bytes(model_onnx)


def evaluate_row(artifact: Path, max_tokens: int | None) -> dict[str, Any]:
    """``cwca-export eval ARTIFACT --data HELDOUT --json`` (the tool's protocol)."""
    args = ["eval", str(artifact), "--data", str(HELDOUT), "--json"]
    if max_tokens:
        args += ["--max-tokens", str(max_tokens)]
    report = json.loads(run_cli(*args))
    return {k: report[k] for k in ("perplexity", "nll", "tokens", "windows", "seq_len", "stride")}


def measure_row(model_onnx: Path, config: Any) -> dict[str, Any]:
    from cwca_export.exporter.measure import measure_runtime

    got = measure_runtime(model_onnx, config)
    return {
        "resident_bytes": got["resident_bytes"],
        "prefill_p50_ms": got["latency_ms"]["prefill"]["p50"],
        "decode_p50_ms": got["latency_ms"]["decode"]["p50"],
        "decode_p90_ms": got["latency_ms"]["decode"]["p90"],
    }


def add_round(row: dict[str, Any], config: Any) -> None:
    """One more memory and latency measurement of the row; p50s are the lowest over rounds."""
    got = row.setdefault("rounds", [])
    got.append(measure_row(Path(row["artifact"]) / "model.onnx", config))
    row["resident_bytes"] = got[0]["resident_bytes"]
    for key in ("prefill_p50_ms", "decode_p50_ms", "decode_p90_ms"):
        row[key] = min(r[key] for r in got)


def node_formats(model: Any) -> dict[str, int]:
    """Nodes of each weight-carrying kind in the graph (what the peer really produced)."""
    kinds = (
        "MatMul",
        "MatMulNBits",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "Gather",
        "GatherBlockQuantized",
        "DequantizeLinear",
    )
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in kinds:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------- the tool's rows (hook)


# ---------------------------------------------------------------- plan of rows


def smallest_fitting_ratio(
    build: Callable[[float], Any], limit: int, step: float = 0.05
) -> tuple[float, int] | None:
    """Smallest ratio on a ``step`` grid whose artifact fits ``limit`` bytes."""
    import tempfile

    def size(ratio: float) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            import onnx

            onnx.save_model(build(ratio), f"{tmp}/m.onnx")
            return os.path.getsize(f"{tmp}/m.onnx")

    # from one step up: NNCF 3.4 reads ratio 0 as "unset" and compresses everything to INT4
    grid = [round(i * step, 4) for i in range(1, int(round(1 / step)) + 1)]
    if size(1.0) > limit:
        return None
    lo, hi = 0, len(grid) - 1  # grid[hi] fits
    sizes = {hi: None}
    while lo < hi:
        mid = (lo + hi) // 2
        s = size(grid[mid])
        sizes[mid] = s
        if s <= limit:
            hi = mid
        else:
            lo = mid + 1
    return grid[hi], sizes.get(hi) or size(grid[hi])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument(
        "--work", type=Path, default=Path("bench_budget_work"), help="artifact folders (kept)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench_budget.json"),
        help="results JSON (rewritten per row)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="4,096 held-out tokens, 8 calibration windows of 64"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="held-out tokens (default: all)"
    )
    parser.add_argument("--calib-data", type=Path, default=TRAIN)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument(
        "--latency-x",
        type=float,
        default=1.2,
        help="latency budget: decode p50 <= this x dense fp32 decode p50 (same run)",
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency shape")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ORT intra-op threads for latency (1: on a shared 2-core machine a second thread"
        " spins against other processes and p50s swing several-fold; 0: ORT's default)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="measurement passes over all rows (p50: lowest)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated row-name prefixes to run (a trailing $: the exact name)",
    )
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="build nothing: measure the rows in --out again (implies --resume)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep rows already in --out with the same token count"
    )
    parser.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an artifact folder built elsewhere (the tool's budget search) as one more row; repeatable",
    )
    parser.add_argument(
        "--table", action="store_true", help="only print the table of an existing --out"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.table:
        doc = json.loads(args.out.read_text())
        limits = {float(k.rstrip("x")): v for k, v in doc["budgets"].items()}
        finish(doc["rows"], limits, doc["latency_budget"]["decode_p50_x_dense"])
        gptq_against_rtn(doc["rows"])
        print(
            table(
                doc["rows"], limits, doc["max_tokens"], doc["latency_budget"]["decode_p50_x_dense"]
            )
        )
        return 0
    from cwca_export.exporter.measure import MeasureConfig
    from cwca_export.versions import library_versions

    max_tokens = args.max_tokens or (4096 if args.quick else None)
    if args.quick:
        args.calib_samples, args.calib_seq_len = 8, 64
    config = MeasureConfig(warmup=5, runs=args.runs, threads=args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    extra: list[tuple[str, Path]] = []
    for spec in args.artifact:
        name, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "model.onnx").is_file():
            print(f"error: --artifact {spec!r}: expected NAME=DIR with DIR/model.onnx", file=sys.stderr)
            return 2
        extra.append((name, Path(folder).resolve()))

    previous: dict[str, dict[str, Any]] = {}
    old_search: dict[str, Any] = {}
    failed: dict[str, dict[str, Any]] = {}
    args.resume = args.resume or args.remeasure
    if args.resume and args.out.is_file():
        old = json.loads(args.out.read_text())
        if old.get("max_tokens") == max_tokens:
            previous = {r["name"]: r for r in old["rows"] if "error" not in r}
            failed = {r["name"]: r for r in old["rows"] if "error" in r}
            old_search = old.get("nncf_ratio_search") or {}

    started = time.time()
    dense_dir = work / "dense-fp32"
    if not (dense_dir / "model.onnx").is_file():
        run_cli("export", str(args.model), "--out", str(dense_dir), "--overwrite")
    dense_onnx = dense_dir / "model.onnx"
    dense_bytes = graph_bytes(dense_onnx)
    limits = {x: int(x * dense_bytes) for x in BUDGETS}
    feeds = calibration_feeds(dense_onnx, args.calib_data, args.calib_samples, args.calib_seq_len)

    def tool_export(flags: list[str]) -> Callable[[Path], None]:
        def go(out: Path) -> None:
            run_cli("export", str(args.model), "--out", str(out), "--overwrite", *flags)

        return go

    plans: list[tuple[str, str, dict[str, Any], Any]] = [
        ("dense fp32", "dense", {"command": "cwca-export export MODEL"}, None),
        (
            "dense int8 (tool)",
            "tool quantize",
            {"command": "cwca-export export MODEL --quantize int8"},
            tool_export(["--quantize", "int8"]),
        ),
        (
            "dense int4 b32 sym (tool)",
            "tool quantize",
            {"command": "cwca-export export MODEL --quantize int4"},
            tool_export(["--quantize", "int4"]),
        ),
    ]
    for name, folder in extra:
        plans.append((name, "tool artifact", {"artifact": str(folder)}, folder))
    for algo in ("rtn", "hqq", "gptq"):
        for block in (32, 128):
            for embed in (False, True):
                name = f"ORT {algo.upper()} int4 b{block}" + (" +emb" if embed else "")
                plans.append(
                    (
                        name,
                        "ort int4",
                        {"algo": algo, "block": block, "embedding": embed},
                        (lambda a=algo, b=block, e=embed: ort_int4(dense_onnx, a, b, e, feeds)),
                    )
                )

    # NNCF: ratio 1 with AWQ / scale estimation on and off, INT4_SYM, all_layers
    nncf_fixed = [
        ("NNCF int8a", {"mode": "INT8_ASYM"}, None),
        ("NNCF int4a g64 r1.00", {}, 1.0),
        ("NNCF int4a g64 r1.00 AWQ", {"awq": True}, 1.0),
        ("NNCF int4a g64 r1.00 SE", {"scale_estimation": True}, 1.0),
        ("NNCF int4a g64 r1.00 AWQ+SE", {"awq": True, "scale_estimation": True}, 1.0),
        ("NNCF int4s g64 r1.00", {"mode": "INT4_SYM"}, 1.0),
        (
            "NNCF int4a g64 r1.00 all_layers AWQ+SE",
            {"awq": True, "scale_estimation": True, "all_layers": True},
            1.0,
        ),
    ]
    for name, opts, ratio in nncf_fixed:
        data = feeds if (opts.get("awq") or opts.get("scale_estimation")) else None
        plans.append(
            (
                name,
                "nncf",
                {"ratio": ratio, "group": NNCF_GROUP, "data_aware": data is not None, **opts},
                (
                    lambda r=ratio, o=opts, d=data: nncf_compress(
                        dense_onnx, ratio=r, dataset=d, **o
                    )
                ),
            )
        )

    # NNCF ratio search: the smallest INT4 ratio that meets each budget (data-free sizes)
    searched: dict[float, float] = {}
    ratio_search: dict[str, Any] = {}
    wanted = args.only is None or any(
        p.startswith("NNCF") or "NNCF".startswith(p) for p in args.only.split(",")
    )
    if wanted:
        for x, limit in limits.items():
            if f"{x:.2f}x" in old_search:  # --resume: the sizes do not depend on the tokens
                kept = old_search[f"{x:.2f}x"]
                found = None if kept is None else (kept["ratio"], kept["bytes"])
            else:
                found = smallest_fitting_ratio(
                    lambda r: nncf_compress(dense_onnx, ratio=r)[0], limit
                )
            ratio_search[f"{x:.2f}x"] = (
                None if found is None else {"ratio": found[0], "bytes": found[1]}
            )
            print(f"NNCF ratio for {x:.2f}x ({limit:,} B): {found}", flush=True)
            if found is not None and found[0] < 1.0:
                searched[x] = found[0]
    for x, ratio in searched.items():
        for label, opts in (
            ("", {}),
            (" Hessian", {"hessian": True}),
            (" Hessian+AWQ+SE", {"hessian": True, "awq": True, "scale_estimation": True}),
        ):
            name = f"NNCF int4a g64 r{ratio:.2f}{label}"
            if any(p[0] == name for p in plans):
                continue
            data = feeds if opts else None
            plans.append(
                (
                    name,
                    "nncf",
                    {
                        "ratio": ratio,
                        "group": NNCF_GROUP,
                        "for_budget": x,
                        "data_aware": data is not None,
                        **opts,
                    },
                    (
                        lambda r=ratio, o=opts, d=data: nncf_compress(
                            dense_onnx, ratio=r, dataset=d, **o
                        )
                    ),
                )
            )

    # the rows that decide each budget first, so that a run cut short has measured them
    plans.sort(
        key=lambda plan: next(
            (i for i, p in enumerate(PRIORITY) if plan[0].startswith(p)), len(PRIORITY)
        )
    )
    if args.remeasure:  # nothing built: the rows already in --out, measured again in one run
        plans = [plan for plan in plans if plan[0] in previous or plan[0] in failed]
    only = [p.strip() for p in args.only.split(",")] if args.only else None
    rows: list[dict[str, Any]] = []

    def save() -> None:
        doc = {
            "model": str(args.model),
            "heldout": str(HELDOUT),
            "max_tokens": max_tokens,
            "calibration": {
                "data": str(args.calib_data),
                "samples": args.calib_samples,
                "seq_len": args.calib_seq_len,
            },
            "dense_graph_bytes": dense_bytes,
            "budgets": {f"{x:.2f}x": b for x, b in limits.items()},
            "latency_budget": {"decode_p50_x_dense": args.latency_x},
            "measure_config": config.__dict__,
            "nncf_ratio_search": ratio_search,
            "machine": machine(),
            "versions": library_versions() | extra_versions(),
            "elapsed_s": round(time.time() - started, 1),
            "rows": rows,
        }
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(args.out)

    for name, family, params, build in plans:
        if only and not any(selects(p, name) for p in only) and name != "dense fp32":
            continue
        if args.remeasure and name in failed:  # its failure stands
            rows.append(failed[name])
            continue
        if name in previous:  # built and evaluated before: measured again, in this run's config
            row = {k: v for k, v in previous[name].items() if k not in MEASURED}
            add_round(row, config)
            rows.append(row)
            print(f"{time.time() - started:7.0f}s {name}: kept from {args.out}", flush=True)
            continue
        folder = work / slug(name)
        row: dict[str, Any] = {"name": name, "family": family, "params": params}
        t0 = time.time()
        try:
            if build is None:
                model_onnx = dense_onnx
            elif family == "tool artifact":
                model_onnx = build / "model.onnx"
            elif family == "tool quantize":
                build(folder)
                model_onnx = folder / "model.onnx"
            else:
                model, notes = build()
                row["notes"] = notes
                model_onnx = write_artifact(model, dense_dir, folder)
            row["build_s"] = round(time.time() - t0, 1)
            import onnx

            row["nodes"] = node_formats(onnx.load(str(model_onnx), load_external_data=False))
            row["disk_bytes"] = graph_bytes(model_onnx)
            row["x_dense"] = row["disk_bytes"] / dense_bytes
            row["artifact"] = str(model_onnx.parent)
            row.update(evaluate_row(model_onnx.parent, max_tokens))
            add_round(row, config)
        except Exception as exc:  # a peer that fails is a row with its reason, not a crash
            row["error"] = f"{type(exc).__name__}: {first_line(exc)}"
            if os.environ.get("CWCA_DEBUG") == "1":
                traceback.print_exc()
        rows.append(row)
        print(
            f"{time.time() - started:7.0f}s {name}: "
            + (
                row.get("error")
                or f"{row['disk_bytes'] / 2**20:.2f} MiB ({row['x_dense']:.3f}x)"
                f" ppl {row['perplexity']:.3f}"
                f" decode {row['decode_p50_ms']:.2f} ms"
            ),
            flush=True,
        )
        save()

    # memory and latency: one round right after each row's eval, then --rounds - 1 more
    # round-robin passes over all rows, so that load from other processes drifting over the run
    # hits every row alike; the row's p50 is the lowest of its rounds' p50s
    for round_ in range(1, args.rounds):
        for row in rows:
            if "error" in row or "artifact" not in row or len(row.get("rounds", [])) > round_:
                continue
            try:
                add_round(row, config)
            except Exception as exc:
                row["error"] = f"measure: {type(exc).__name__}: {str(exc).strip()[:300]}"
        print(
            f"{time.time() - started:7.0f}s latency round {round_ + 1}/{args.rounds} done",
            flush=True,
        )
        save()

    finish(rows, limits, args.latency_x)
    gptq_against_rtn(rows)
    save()
    print(table(rows, limits, max_tokens, args.latency_x))
    return 0


def codes_differing(a: Path, b: Path) -> float:
    """Fraction of MatMulNBits weight bytes that differ between two artifacts (nodes in order)."""
    import onnx
    from onnx import numpy_helper

    def codes(path: Path) -> list[np.ndarray]:
        model = onnx.load(str(path / "model.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        found = []
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                k = next(a.i for a in node.attribute if a.name == "K")
                packed = numpy_helper.to_array(inits[node.input[1]])
                # the bytes holding the K real weights of each column; the rest pads the last block
                found.append(packed.reshape(packed.shape[0], -1)[:, : k // 2])
        return found

    left, right = codes(a), codes(b)
    if len(left) != len(right) or any(x.shape != y.shape for x, y in zip(left, right, strict=True)):
        return float("nan")
    differ = sum(int((x != y).sum()) for x, y in zip(left, right, strict=True))
    return differ / sum(x.size for x in left)


def gptq_against_rtn(rows: list[dict[str, Any]]) -> None:
    """Record how far each GPTQ row's 4-bit codes are from the RTN row with the same settings."""
    by_name = {r["name"]: r for r in rows if "artifact" in r and "error" not in r}
    for name, row in by_name.items():
        rtn = by_name.get(name.replace("ORT GPTQ", "ORT RTN"))
        if name.startswith("ORT GPTQ") and rtn is not None:
            with contextlib.suppress(OSError):  # artifact folders deleted since the run
                row["codes_differing_from_rtn"] = codes_differing(
                    Path(row["artifact"]), Path(rtn["artifact"])
                )


def finish(rows: list[dict[str, Any]], limits: dict[float, int], latency_x: float) -> None:
    """Damage against dense fp32 and the budgets each row fits."""
    dense = next((r for r in rows if r["name"] == "dense fp32" and "error" not in r), None)
    for row in rows:
        if "error" in row or dense is None:
            continue
        row["damage_pct"] = 100 * (row["perplexity"] / dense["perplexity"] - 1)
        row["fits"] = [f"{x:.2f}x" for x, limit in limits.items() if row["disk_bytes"] <= limit]
        row["fits_latency"] = row["decode_p50_ms"] <= latency_x * dense["decode_p50_ms"]


def table(
    rows: list[dict[str, Any]], limits: dict[float, int], max_tokens: int | None, latency_x: float
) -> str:
    """The markdown table of every row, then the best row per budget."""
    head = (
        "| row | MiB | x fp32 | ppl | damage | resident MiB | prefill p50 ms | decode p50 ms |"
        " fits bytes |"
        " fits latency |"
    )
    lines = [
        f"Held-out tokens: {'all' if max_tokens is None else max_tokens}",
        "",
        head,
        "|" + "---|" * 10,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['name']} | {r['disk_bytes'] / 2**20:.2f} | {r['x_dense']:.3f} |"
            f" {r['perplexity']:.3f} |"
            f" {r.get('damage_pct', float('nan')):+.2f}% | {r['resident_bytes'] / 2**20:.1f} |"
            f" {r['prefill_p50_ms']:.2f} | {r['decode_p50_ms']:.2f} |"
            f" {', '.join(r.get('fits', [])) or '-'} |"
            f" {'yes' if r.get('fits_latency') else 'no'} |"
        )
    dense = next((r for r in rows if r["name"] == "dense fp32" and "error" not in r), None)
    fast = [r for r in rows if r.get("fits_latency")]
    if dense is not None:
        best = min(fast, key=lambda r: r["perplexity"])
        lines += [
            "",
            f"Latency budget: decode p50 <= {latency_x:g} x dense fp32's"
            f" = {latency_x * dense['decode_p50_ms']:.2f} ms; best that fits:"
            f" {best['name']} ({best['perplexity']:.3f}, {best['damage_pct']:+.2f}%)",
        ]
    for r in rows:
        if "codes_differing_from_rtn" in r:
            lines.append(
                f"{r['name']}: {100 * r['codes_differing_from_rtn']:.3f}% of its 4-bit weight"
                " bytes differ from the RTN row's"
            )
    lines.append("")
    lines.append("Best row per byte budget (lowest perplexity that fits):")
    for x in limits:
        label = f"{x:.2f}x"
        fit = [r for r in rows if label in r.get("fits", [])]
        best = min(fit, key=lambda r: r["perplexity"]) if fit else None
        lines.append(
            f"- {label}: "
            + (
                f"{best['name']} ({best['perplexity']:.3f}, {best['damage_pct']:+.2f}%)"
                if best
                else "no peer fits"
            )
        )
    return "\n".join(lines)


def selects(pattern: str, name: str) -> bool:
    """``--only`` matching: a prefix, or the exact name when the pattern ends with ``$``."""
    return name == pattern[:-1] if pattern.endswith("$") else name.startswith(pattern)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def machine() -> dict[str, Any]:
    """Cores, CPU model (lscpu) and load, for the benchmark's provenance."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        lscpu = []
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "")
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "platform": platform.platform(),
        "loadavg_at_save": os.getloadavg(),
    }


def extra_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("nncf", "onnxruntime", "onnx"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


if __name__ == "__main__":
    sys.exit(main())
