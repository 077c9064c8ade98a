"""Predicted peak memory and relative time of every step of the recommended path.

One formula per step, in the model's shape (P parameters, L blocks, hidden h, intermediate I,
vocabulary V, bytes per element s) and the run's settings (K calibration sequences of N
tokens, B per forward). docs/memory.md states the same formulas in words and cites this
module; ``benchmarks/bench_scale.py`` compares them with measured peaks at three sizes and
prints their projection to 7B and 70B. Nothing here imports torch: a projection for a model
nobody has downloaded is arithmetic on its config.

Every step's cost is a sum of named terms (bytes), each placed on the ``device`` (what must
sit beside the model where its forwards run: a GPU's memory when there is one) or the
``host``. On a CPU-only run both are host memory, and the measured peak resident size is
``runtime + device + host``, ``runtime`` being what the interpreter holds after importing the
step's libraries (a measured constant: about 0.4 GiB for torch + transformers). A third
place, ``mapped``, holds weights a step reads through a memory map of a file (``--low-memory``:
a float32 scratch file, an artifact's external data): resident once touched, so counted in
a measured resident size, but clean file pages the kernel evicts under pressure and reads
again, not memory the step needs of its own (docs/memory.md, "Weights as file pages").

Time is in *forward units*: one forward of the whole model over the K x N calibration tokens
(about 2 x P x K x N floating-point operations). Steps whose work does not scale with tokens
(export, SVD) add a term in the same unit through the FLOPs they do. The units predict how
steps compare and how they grow with the model; seconds per unit are the machine's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
DEFAULT_CHUNK_TOKENS = 256  # evaluate.DEFAULT_CHUNK_TOKENS (eval's float64 chunk)
DEFAULT_PROBE_CACHE = 2 * GIB  # plan_probe.DEFAULT_CACHE_BYTES (refine --probe-cache)
DAMAGE_LOGIT_CHUNK = 2**25  # damage._LOGIT_CHUNK: logits elements the reproduced tail holds at once

# Measured constants (bench_scale.py, torch 2.x CPU, fp32), each explained where it is used.
# fp32 graph copies beside the torch model at an export's peak (see export()), by whether the
# traced graph fits one protobuf (inline weights) or goes to external data; the same for both
# backends (measured: optimum and onnx within 1% at 5M, 40M and 150M)
EXPORT_COPIES = {"inline": 3.2, "external": 1.15}
# an ONNX Runtime session's peak while it is created, above its resident set just after, in fp32
# copies of the weights (eval of a 150M artifact: 93 MiB over 584 MiB; BENCHMARKS.md, "Every step at three sizes")
SESSION_CREATION_COPIES = 0.16
PROTOBUF_LIMIT = 2**31  # torch.onnx.export writes the weights as external data above this
# fp32 copies a quantized export peaks above the plain export's peak (benchmarks/bench_scale.py at
# 5M / 40M / 150M: int8 +0.14 / +0.92 / +0.19 copies, int4 none: its phase stays under tracing's)
QUANT_COPIES = {None: 0.0, "int8": 0.6, "int4": 0.0}
# above 2 GiB the quantizer's phase is the peak of the ordinary export: ONNX Runtime's quantizer
# holds the whole fp32 graph and what it builds from it. Measured at 550M (whole-graph int8 when
# --low-memory still used it: 3.04 fp32 copies beyond the runtime; the quantizer alone, int8 3.15
# and int4 1.30: benchmarks/bench_low_memory.py, BENCHMARKS.md "Weights as file pages")
EXTERNAL_QUANT_COPIES = 3.04
# export --low-memory --quantize (streamed_quantize): the quantizer sees one weight group at a
# time; its own memory is copies of the largest group's fp32 weights (ModelShape.largest_weight_group).
# Measured at 550M, whose largest group is the 32k x 1536 head (187.5 MiB), the quantizer alone in
# a process of its own: int8 1,242 MiB (6.6 copies), int4 610 MiB (3.25) beyond the runtime
STREAMED_QUANT_COPIES = {"int8": 6.6, "int4": 3.25}
# a quantized artifact's sessions prepack (its final checks, the measurement worker): their own
# memory in fp32 copies of the weights, measured at 550M after creation and forwards. Inline (the
# quantized graph under --external-data-threshold; the session also parses the file's bytes):
# bench_low_memory.py's session probe by hand, int8 771 MiB, int4 271 MiB, of 2,103 MiB
QUANT_SESSION_COPIES = {"int8": 0.37, "int4": 0.13}
# with external data, as every 7B int8 / int4 artifact has (bench_low_memory.py
# --quantized-external-only, one prepacked session after a forward: int8 506 MiB, int4 264 MiB)
EXTERNAL_QUANT_SESSION_COPIES = {"int8": 0.24, "int4": 0.13}
# a MatMul weight --exclude keeps in float32 is prepacked in float32: its own bytes once, in place of
# its share of the quantized weights' (550M, int8 with external data, --exclude lm_head: +140 MiB ~
# 187.5 x (1 - 0.25), bench_low_memory.py --quantized-external-only)
EXCLUDED_SESSION_COPIES = 1.0
# a quantized artifact under 2 GiB is inline: its layout's write and the final checks' session read
# the graph whole, about 2.8 x its bytes of own memory beyond the runtime. Read off two 550M int8
# exports (bench_low_memory.py --quantized-inline-only, CLI process sampled every 10 ms, 469 MiB
# runtime): 1,923 MiB for a 527 MiB artifact (2.76), 2,348 MiB with --exclude lm_head (668 MiB: 2.81);
# not an independent check
INLINE_QUANT_GRAPH_COPIES = 2.8
# export --low-memory --dtype float16 (streamed_fp16): ONNX Runtime's converter on the graph without
# its weights, each weight converted a slice (streamed_fp16.SLICE_ELEMENTS float32 values) at a time
# into the data file: its own memory is a slice's temporaries, the same at any size. Measured at
# 550M, the conversion alone in a process of its own: 97 MiB beyond the runtime (the whole-graph
# converter handed the file 3,806 MiB, 1.81 copies; handed the loaded model, as the ordinary export
# does, it fails at protobuf's 2 GiB after 6,035 MiB): bench_low_memory.py --fp16-only
STREAMED_FP16_BYTES = 100 * 2**20
# a float16 artifact's sessions on ONNX Runtime's CPU provider (the final checks, the measurement
# worker; no prepacking). Inline (float16 weights under 2 GiB, the default --external-data-threshold):
# the session holds the graph's bytes and, optimised, a float32 copy of the weights (550M inline: the
# CLI process 3,506 MiB sampled, 3,037 beyond its 469 MiB runtime, 1.44 fp32 copies; the measurement
# worker 3,046 MiB after the runs; bench_low_memory.py --fp16-only)
FP16_CPU_SESSION_COPIES = 1.45
# with external data the sessions cast each weight as a node reads it (exporter.session.
# casts_float16_per_run: no graph optimisation, no arena, priority order): a weight or two in float32
# at a time, in copies of the largest tensor. One session sampling RssAnon every 3 ms over creation
# and two 16-token forwards (benchmarks/bench_fp16_session.py, three fresh processes each): 550M
# (largest tensor 187.5 MiB) 301 MiB beyond the runtime, 1.61 copies; 150M (93.8 MiB) 131 MiB, 1.40
# (this constant over-predicts it by 15%; docs/memory.md, "Float16 a tensor at a time"); the export
# with external data: its measurement worker 38 MiB after the runs, the CLI process peaking in its
# trace at 920 MiB, as the float32 export does (bench_low_memory.py --fp16-only, the 512MB row)
FP16_CAST_TENSOR_COPIES = 1.6
# export --low-memory (onnx backend): copies of the largest tensor torch.onnx.export holds at once
# while tracing with placeholders (shape inference: 3.1, measured at 550M by
# benchmarks/bench_export_phases.py --low-memory). Its sessions do not prepack, so the weights stay
# file pages of the artifact (benchmarks/bench_low_memory.py)
TRACE_TENSOR_COPIES = 3.1
# below 2 GiB the graph is inline: torch builds its proto with every placeholder materialised
# and the fill rewrites it whole (measured at 150M: 3.06 and 4.15 copies; the ordinary export: 3.2 + 1)
INLINE_LOW_MEMORY_COPIES = 4.15


@dataclass(frozen=True)
class ModelShape:
    """What the formulas read of a decoder-only model (a Llama-like config).

    Attributes:
        params: P, every parameter (embeddings and head once each when tied).
        blocks: L decoder blocks; hidden: h; intermediate: I (MLP width);
        vocab: V; heads / kv_heads: attention and key-value heads; head_dim: per head;
        tied: input embedding and head share one matrix; dtype_bytes: s of the weights.
    """

    params: int
    blocks: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    dtype_bytes: int = 4

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype_bytes: int = 4) -> ModelShape:
        """From a config.json's fields (``hidden_size``, ``num_hidden_layers``, ...)."""
        h, i = int(config["hidden_size"]), int(config["intermediate_size"])
        v, L = int(config["vocab_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        hd = int(config.get("head_dim") or h // heads)
        tied = bool(config.get("tie_word_embeddings", True))
        block = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * i + 2 * h
        params = L * block + v * h * (1 if tied else 2) + h
        return cls(params, L, h, i, v, heads, kv, hd, tied, dtype_bytes)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype_bytes: int = 4) -> ModelShape:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return cls.from_config(config, dtype_bytes)

    @property
    def block_linear_params(self) -> int:
        """Weights of one block's Linears (q, k, v, o, gate, up, down)."""
        h, kvd = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * self.heads * self.head_dim + 2 * h * kvd + 3 * h * self.intermediate

    @property
    def largest_linear(self) -> tuple[int, int]:
        """(out, in) of the block's largest Linear (an MLP projection)."""
        return (self.intermediate, self.hidden)

    @property
    def largest_weight_group(self) -> int:
        """Weights, in parameters, of the largest group of weight nodes that share an input (what
        ``streamed_quantize`` quantizes at once): the embedding or the head (V x h), gate and up
        (2 x I x h), or q, k and v."""
        h, hd = self.hidden, self.head_dim
        return max(self.vocab * h, 2 * self.intermediate * h, h * hd * (self.heads + 2 * self.kv_heads))

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    def with_dtype(self, dtype_bytes: int) -> ModelShape:
        return ModelShape(**{**asdict(self), "dtype_bytes": dtype_bytes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def llama_7b() -> ModelShape:
    """Llama-2-7B's shape: 32 x 4096, intermediate 11008, 32 heads, 32k vocabulary, untied."""
    return ModelShape.from_config(dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                       vocab_size=32000, num_attention_heads=32, num_key_value_heads=32,
                                       tie_word_embeddings=False), dtype_bytes=2)


def llama_70b() -> ModelShape:
    """Llama-2-70B's shape: 80 x 8192, intermediate 28672, GQA 64/8 heads, 32k vocabulary."""
    return ModelShape.from_config(dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                       vocab_size=32000, num_attention_heads=64, num_key_value_heads=8,
                                       tie_word_embeddings=False), dtype_bytes=2)


@dataclass(frozen=True)
class RunSettings:
    """The run's sizes: K = ``samples`` sequences of N = ``seq_len`` tokens, B = ``batch_size``
    per forward (score's damage, compress, eval), and the steps' own knobs at their CLI values."""

    samples: int
    seq_len: int
    batch_size: int = 8
    eval_tokens: int = 16384
    eval_batch: int | None = None
    refine_samples: int | None = None  # refine's K (default: samples)
    refine_seq_len: int | None = None
    refine_batch: int = 8  # PlanLoss / refine forwards
    max_evals: int = 8
    tune_plans: int = 5  # refine's candidate start plans (1 + 4 band widths; 2 with --no-tune)
    damage_points: int = 4
    max_cache: int | None = None  # score --max-cache
    probe_cache: int = DEFAULT_PROBE_CACHE  # refine --probe-cache
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepCost:
    """A step's predicted peak: ``terms`` (bytes) on ``device`` or ``host``, and its time."""

    step: str
    device: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    time_units: float = 0.0
    runtime: int = 0  # the interpreter and its libraries (measured), counted in peak_bytes
    mapped: dict[str, float] = field(default_factory=dict)  # file pages read through a map (evictable)

    @property
    def device_bytes(self) -> int:
        return int(sum(self.device.values()))

    @property
    def mapped_bytes(self) -> int:
        return int(sum(self.mapped.values()))

    @property
    def resident_bytes(self) -> int:
        """Peak resident size with the mapped file pages counted, as ``ru_maxrss`` counts them."""
        return self.peak_bytes + self.mapped_bytes

    @property
    def host_bytes(self) -> int:
        return int(sum(self.host.values()))

    @property
    def peak_bytes(self) -> int:
        """Peak resident bytes of a CPU-only run: runtime + device terms + host terms."""
        return self.runtime + self.device_bytes + self.host_bytes

    @property
    def terms(self) -> dict[str, float]:
        return {**{f"device:{k}": v for k, v in self.device.items()},
                **{f"host:{k}": v for k, v in self.host.items()},
                **{f"mapped:{k}": v for k, v in self.mapped.items()}}


# ------------------------------------------------------------------ shared terms


def forward_tokens_unit(shape: ModelShape, tokens: int) -> float:
    """FLOPs of one forward over ``tokens`` tokens: 2 x (block weights + head) per token."""
    return 2.0 * (shape.blocks * shape.block_linear_params + shape.vocab * shape.hidden) * tokens


def block_activations(shape: ModelShape, batch: int, seq: int) -> float:
    """Transient bytes of one block's forward without autograd (B x N tokens): the residual,
    q / k / v / attention output (4 h), the MLP's gate, up and their product (3 I), and the
    eager attention's scores and probabilities (2 x heads x N per token)."""
    tokens = batch * seq
    per_token = 4 * shape.hidden + 3 * shape.intermediate + 2 * shape.heads * seq
    return float(tokens * per_token * shape.dtype_bytes)


def saved_activations(shape: ModelShape, batch: int, seq: int) -> float:
    """Bytes autograd keeps for a backward over all L blocks (B x N tokens): per block and
    token the norms' inputs and outputs, q / k / v before and after rotary, the key-value
    heads repeated to every head, attention output, o_proj's input and the residuals (about
    13 h + 4 kv_heads x head_dim), gate / up / SiLU / product (4 I), scores and probabilities
    (2 x heads x N)."""
    kvd = shape.kv_heads * shape.head_dim
    per_token = 13 * shape.hidden + 4 * kvd + 4 * shape.intermediate + 2 * shape.heads * seq
    return float(shape.blocks * batch * seq * per_token * shape.dtype_bytes)


def ce_logits(shape: ModelShape, batch: int, seq: int) -> float:
    """A whole-batch cross-entropy: the logits (s), their float32 copy and its log-softmax."""
    elements = batch * seq * shape.vocab
    return float(elements * (shape.dtype_bytes + 4 + 4))


# ------------------------------------------------------------------ steps


def score_damage(shape: ModelShape, run: RunSettings, runtime: int = 0) -> StepCost:
    """``score --method damage``: the dense pass caches every block's inputs (K x N x h x s per
    block, L blocks, or at most ``--max-cache``), then each probe copies one block, compresses it
    and runs it and the later blocks from the cache, then the tail's logits in row chunks."""
    s, K, N, B, L = shape.dtype_bytes, run.samples, run.seq_len, run.batch_size, shape.blocks
    per_block = K * N * shape.hidden * s
    cached = L * per_block if run.max_cache is None else max(per_block, min(L * per_block, run.max_cache))
    m, n = shape.largest_linear
    rows = max(1, DAMAGE_LOGIT_CHUNK // max(1, N * shape.vocab))
    probe = (shape.block_linear_params * s  # the probed copy
             + 3 * m * n * 4  # wanda's score |W| x norm, its row sort values / indices
             + block_activations(shape, B, N)
             + ce_logits(shape, min(B, rows), N))
    dense = ce_logits(shape, B, N) + block_activations(shape, B, N)
    probes = run.damage_points * sum((L - k) / L for k in range(L))
    windows = 1 if run.max_cache is None else -(-L * per_block // max(per_block, run.max_cache))
    return StepCost("score_damage", device={"weights": shape.weight_bytes, "input cache": cached,
                                            "probe or dense pass": max(probe, dense)},
                    time_units=windows + 1 + probes, runtime=runtime)


def score_fisher(shape: ModelShape, run: RunSettings, runtime: int = 0) -> StepCost:
    """``score --method fisher`` (one sequence per backward): the gradient moments (sum and sum
    of squares of every block weight's gradient, fp32), the activations autograd saves over
    all blocks for N tokens, the logits' cross-entropy and its gradient, one weight's gradient."""
    m, n = shape.largest_linear
    moments = 2 * shape.blocks * shape.block_linear_params * 4
    return StepCost("score_fisher", device={
        "weights": shape.weight_bytes, "gradient moments": moments,
        "saved activations": saved_activations(shape, 1, run.seq_len),
        "logits and gradient": ce_logits(shape, 1, run.seq_len) + shape.vocab * run.seq_len * 4,
        "one gradient": m * n * 4}, time_units=3.0, runtime=runtime)


def refine(shape: ModelShape, run: RunSettings, runtime: int = 0) -> StepCost:
    """``refine`` of a pruning plan (``PlanLoss``): a dense copy of every block's Linear weights,
    at most ``--probe-cache`` bytes of pruned block copies (at least one; at most one per
    (block, ratio) seen: every block of each start plan tuned, two blocks per later exchange),
    wanda's per-Linear input norms, and one whole-plan forward's logits."""
    s, L = shape.dtype_bytes, shape.blocks
    K = run.refine_samples or run.samples
    N = run.refine_seq_len or run.seq_len
    block = shape.block_linear_params * s
    tuned = min(run.tune_plans, run.max_evals)
    seen = L * tuned + 2 * max(0, run.max_evals - tuned)
    cached = min(max(1, run.probe_cache // block), seen) * block
    B = min(run.refine_batch, K)
    return StepCost("refine", device={
        "weights": shape.weight_bytes, "dense block copies": L * block, "pruned block copies": cached,
        "forward": ce_logits(shape, B, N) + block_activations(shape, B, N)},
        time_units=(2 + run.max_evals) * (K * N) / (run.samples * run.seq_len), runtime=runtime)


def compress(shape: ModelShape, run: RunSettings, method: str, runtime: int = 0) -> StepCost:
    """``compress --method M`` layer by layer: block 0's inputs for every batch (K x N x h x s,
    overwritten by each block's outputs), one block's forward and the method's per-Linear work.
    Saving (``save_pretrained``, safetensors) writes tensor by tensor: no second copy of the
    weights (measured: the peak stays at the weights plus the terms above)."""
    s, K, N, B = shape.dtype_bytes, run.samples, run.seq_len, run.batch_size
    m, n = shape.largest_linear
    data_aware = method in {"wanda", "sparsegpt", "width", "asvd"}
    device: dict[str, float] = {"weights": shape.weight_bytes}
    work = {
        "magnitude": 3 * m * n * 4,  # |W|, its sort values and indices
        "wanda": 3 * m * n * 4,
        "sparsegpt": 3 * max(m, n) ** 2 * 4 + 2 * m * n * 4,  # Gram, its inverse Cholesky, the update
        "width": 3 * m * n * 4,
        "lowrank": 3 * m * n * 4,  # U, S, V^T of the SVD and the product
        "asvd": 3 * m * n * 4,
    }[method]
    flops = 0.0
    if method in {"lowrank", "asvd"}:  # an SVD per Linear: about 4 m n min(m, n) flops
        h, i = shape.hidden, shape.intermediate
        hd = shape.heads * shape.head_dim
        kvd = shape.kv_heads * shape.head_dim
        dims = [(hd, h), (kvd, h), (kvd, h), (h, hd), (i, h), (i, h), (h, i)]
        flops = shape.blocks * sum(4.0 * a * b * min(a, b) for a, b in dims)
    if method == "sparsegpt":  # Cholesky and the column sweep: about n^3 + 2 m n^2 per Linear
        h, i = shape.hidden, shape.intermediate
        flops = shape.blocks * (6 * (h**3 + 2 * h * h * h) + (i**3 + 2 * h * i * i))
    if data_aware:
        device["block inputs"] = K * N * shape.hidden * s
        device["block forward"] = block_activations(shape, B, N)
    device["method work"] = work
    units = (2.0 if data_aware else 0.0) + flops / forward_tokens_unit(shape, K * N)
    return StepCost(f"compress_{method}", device=device, time_units=units, runtime=runtime)


def export(shape: ModelShape, backend: str = "optimum", quantize: str | None = None,
           runtime: int = 0, *, low_memory: bool = False) -> StepCost:
    """``export``: the torch model in float32 (P x 4: export traces a float32 model and refuses
    others) and, at the peak, ``EXPORT_COPIES`` fp32 copies of the
    weights, the largest of its phases (benchmarks/bench_export_phases.py measures each):

    - tracing, when the graph fits one protobuf (P x 4 <= 2 GiB): torch.onnx.export builds
      the proto in memory and returns it serialised (the constant-folded transposed weights,
      the proto, its bytes; Optimum then reloads it): 3.2 copies (measured 3.1 at 150M and
      550M; 4.3 at 40M, whose tied 32k x 512 embedding is a large share of the weights);
    - tracing, above 2 GiB: torch writes each initialiser to disk as it encodes it, Optimum
      reloads them all and rewrites one data file: 1.15 copies (measured 1.13 at 550M, the
      path of every 7B export);
    - verification: one ONNX Runtime session (about one copy: prepacked MatMul weights replace
      their originals), the runtime loader's session opened only after it closes;
    - post-processing: rewriting the graph in the tool's layout (one copy when external).

    With ``--quantize``, ``QUANT_COPIES`` more: the quantizer runs after tracing, and only
    dynamic int8 was measured to peak above it (0.1-0.9 copies; int4 none). Latency is
    measured in a worker process of its own (one session; less than this peak). Time: a few
    passes over the weights (tracing, serialisation, ORT's graph optimisation) and a few short
    forwards."""
    if low_memory:
        return export_low_memory(shape, quantize, runtime)
    fp32 = shape.params * 4
    layout = "inline" if fp32 <= PROTOBUF_LIMIT else "external"
    graph = graph_bytes(shape)
    name = f"export_{backend}" + (f"_{quantize}" if quantize else "")
    copies = EXPORT_COPIES[layout] * graph + QUANT_COPIES.get(quantize, 1.0) * fp32
    if quantize and layout == "external":  # the quantizer's phase, beside the torch model
        copies = max(copies, EXTERNAL_QUANT_COPIES * fp32)
    return StepCost(name, host={"torch model (fp32)": fp32, f"fp32 graph copies ({layout})": copies},
                    time_units=0.0, runtime=runtime)


def graph_bytes(shape: ModelShape) -> int:
    """The traced fp32 graph's initialisers: the weights, and for tied embeddings one more table,
    the head's constant-folded transpose of it (V x h x 4; the tied 40M exports peaked at 1.16 of
    the model's prediction without this term, 0.98 with it: BENCHMARKS.md, "Every step at three sizes")."""
    return shape.params * 4 + (shape.vocab * shape.hidden * 4 if shape.tied else 0)


def quantized_graph_bytes(shape: ModelShape, quantize: str, excluded: int = 0) -> float:
    """An int8 / int4 artifact's bytes: one byte a weight (int8, embedding included), or half a byte
    and a block-32 float32 scale for the Linears with the embedding kept float32 (int4; 550M: 527
    and 487 MiB measured); ``excluded`` parameters (``--exclude``) stay float32."""
    if quantize == "int8":
        return float(shape.params - excluded) + 4.0 * excluded
    fp32 = shape.vocab * shape.hidden + excluded
    return (shape.params - fp32) * (0.5 + 4 / 32) + fp32 * 4


def export_low_memory(shape: ModelShape, quantize: str | None = None, runtime: int = 0, *,
                      fp16: bool = False, excluded: int = 0) -> StepCost:
    """``export --low-memory``, either backend (:mod:`cwca_export.exporter.placeholders`): its
    phases run one after another. The weights are file pages throughout (``mapped``, 4P at the
    most): the checkpoint as loaded (a bfloat16 one stays in its dtype), then the float32 scratch
    file it is widened into (4P) that torch's reference forwards read, then the artifact's data
    file that the sessions (no prepacking) compute from. What the process
    holds of its own (``host``) is the largest of:

    - the trace with placeholder weights: the exporter materialises a stand-in for a moment (its
      shape inference's copies, a matmul's contiguous operand, the encoder's bytes):
      ``TRACE_TENSOR_COPIES`` x the largest tensor, max(V, I) x h x 4;
    - widening into the scratch file and filling the initialisers from it: one 64 MiB block;
    - verification and measurement: a short forward's activations (negligible);
    - post-processing: the external layout streamed a tensor at a time (the largest tensor);
      with ``--quantize`` ONNX Runtime's quantizer on one weight group at a time
      (:mod:`cwca_export.exporter.streamed_quantize`): ``STREAMED_QUANT_COPIES`` x the largest
      group's fp32 weights;
    - with ``--quantize``, the quantized artifact's sessions (final checks, then the measurement
      worker), which prepack as deployed: ``QUANT_SESSION_COPIES`` x 4P for an inline artifact,
      ``EXTERNAL_QUANT_SESSION_COPIES`` x 4P above 2 GiB (:func:`quantized_graph_bytes`); of the
      ``excluded`` MatMul weights ``--exclude`` keeps float32 (parameters; the head: V x h) the
      sessions prepack the float32 bytes, ``EXCLUDED_SESSION_COPIES`` x 4 x excluded, in place of
      their quantized share; a quantized artifact under 2 GiB (inline) is written and read whole,
      ``INLINE_QUANT_GRAPH_COPIES`` x its bytes;
    - with ``fp16`` (``--dtype float16``): ONNX Runtime's float16 converter on the graph without
      its weights, each converted a slice at a time (:mod:`cwca_export.exporter.streamed_fp16`):
      ``STREAMED_FP16_BYTES``, the same at any size; then the float16 artifact's sessions on the
      CPU provider: with external data (2P above 2 GiB) they cast each weight as it is read,
      ``FP16_CAST_TENSOR_COPIES`` x the largest tensor; an inline artifact's hold its bytes and a
      float32 copy, ``FP16_CPU_SESSION_COPIES`` x 4P.

    Below 2 GiB of fp32 weights the graph is inline and the fill rewrites it whole
    (``INLINE_LOW_MEMORY_COPIES``, the process's own): no saving there.

    The peak is the largest phase, one term named after it."""
    fp32 = shape.params * 4
    if fp16 and quantize:
        raise ValueError("float16 and a quantized artifact do not combine (the export refuses them)")
    name = "export_onnx_lowmem" + (f"_{quantize}" if quantize else "_fp16" if fp16 else "")
    if fp32 <= PROTOBUF_LIMIT:
        fill = INLINE_LOW_MEMORY_COPIES * graph_bytes(shape)
        return StepCost(name, host={"peak phase: the inline graph's fill": fill}, time_units=0.0, runtime=runtime)
    largest = max(shape.vocab, shape.intermediate) * shape.hidden * 4
    quantized = quantized_graph_bytes(shape, quantize, excluded) if quantize else 0.0
    inline = bool(quantize) and quantized <= PROTOBUF_LIMIT
    session_copies = (QUANT_SESSION_COPIES if inline else EXTERNAL_QUANT_SESSION_COPIES).get(quantize, 0.0)
    phases = {
        "largest tensor's copies during the trace": TRACE_TENSOR_COPIES * largest,
        "post-processing": (STREAMED_QUANT_COPIES[quantize] * shape.largest_weight_group * 4 if quantize
                            else float(max(largest, STREAMED_FP16_BYTES if fp16 else 0))),
        "the quantized artifact's prepacked sessions": (
            session_copies * (shape.params - excluded) * 4 + EXCLUDED_SESSION_COPIES * excluded * 4
            if quantize else 0.0),
        "the inline quantized artifact's write and checks": INLINE_QUANT_GRAPH_COPIES * quantized if inline else 0.0,
        "the float16 artifact's CPU sessions": (0.0 if not fp16 else FP16_CPU_SESSION_COPIES * fp32
                                                 if fp32 / 2 <= PROTOBUF_LIMIT else FP16_CAST_TENSOR_COPIES * largest),
    }
    phase = max(phases, key=phases.get)
    return StepCost(name, host={f"peak phase: {phase}": phases[phase]}, time_units=0.0, runtime=runtime,
                    mapped={"weights as file pages (checkpoint, float32 scratch file, artifact data)": float(fp32)})


def evaluate(shape: ModelShape, run: RunSettings, artifact: bool = False, runtime: int = 0, *,
             low_memory: bool = False) -> StepCost:
    """``eval``: the model (torch weights, or an ONNX Runtime session of the fp32 artifact), one
    batch's logits (B x N x V; ONNX Runtime returns float32), one forward, and the float64
    chunk of ``chunk_tokens`` positions (2 copies in torch, 3 through NumPy). A session's
    creation peaks ``SESSION_CREATION_COPIES`` above what it then holds. ``low_memory``
    (``eval --low-memory`` of an artifact with external data, above 2 GiB): the session does not
    prepack, so its weights are the data file's pages (``mapped``) and it has no creation peak."""
    B = run.eval_batch or run.batch_size
    N, V, c = run.seq_len, shape.vocab, run.chunk_tokens
    logits_s = 4 if artifact else shape.dtype_bytes
    chunk = (3 if artifact else 2) * min(c, N) * V * 8
    weights = shape.params * 4 if artifact else shape.weight_bytes
    units = run.eval_tokens / (run.samples * run.seq_len)
    device = {"weights": weights, "logits": B * N * V * logits_s, "forward": block_activations(shape, B, N),
              "float64 chunk": chunk}
    mapped = {}
    if artifact and low_memory and shape.params * 4 > PROTOBUF_LIMIT:
        mapped["weights as the artifact's data file pages"] = device.pop("weights")
    elif artifact:  # creating the session peaks above what it then holds (graph optimisation)
        device["session creation"] = SESSION_CREATION_COPIES * shape.params * 4
    name = ("eval_onnx_lowmem" if low_memory else "eval_onnx") if artifact else "eval_torch"
    return StepCost(name, device=device, time_units=units, runtime=runtime, mapped=mapped)


# ------------------------------------------------------------------ dispatch and projection

RECOMMENDED = ("score_damage", "refine", "compress_wanda", "export_optimum", "eval_onnx")


def predict(step: str, shape: ModelShape, run: RunSettings, runtime: dict[str, int] | None = None) -> StepCost | None:
    """The cost of a bench_scale step name (``compress_<method>``, ``export_<backend>[_<q>]``,
    ...), with ``runtime`` {"torch": bytes, "onnx": bytes} as the measured interpreter baseline;
    None for a step the model does not cover (plan: a few KB)."""
    rt = runtime or {}
    torch_rt, onnx_rt = int(rt.get("torch", 0)), int(rt.get("onnx", 0))
    if step == "score_damage":
        return score_damage(shape, run, torch_rt)
    if step == "score_fisher":
        return score_fisher(shape, run, torch_rt)
    if step == "refine":
        return refine(shape, run, torch_rt)
    if step == "compress_uniform":
        return compress(shape, run, "wanda", torch_rt)
    if step.startswith("compress_"):
        return compress(shape, run, step.removeprefix("compress_"), torch_rt)
    if step == "export_uniform":
        return export(shape, "optimum", None, onnx_rt)
    if step.startswith("export_onnx_lowmem"):
        parts = step.split("_")[3:]
        fp16 = parts == ["fp16"]
        return export_low_memory(shape, parts[0] if parts and not fp16 else None, onnx_rt, fp16=fp16)
    if step.startswith("export_"):
        parts = step.split("_")[1:]
        return export(shape, parts[0], parts[1] if len(parts) > 1 else None, onnx_rt)
    if step == "eval_torch":
        return evaluate(shape, run, False, torch_rt)
    if step == "eval_onnx":
        return evaluate(shape, run, True, onnx_rt)
    if step == "eval_onnx_lowmem":
        return evaluate(shape, run, True, onnx_rt, low_memory=True)
    return None


def projection_table(runtime: dict[str, int] | None = None, run: RunSettings | None = None) -> list[dict[str, Any]]:
    """The recommended path's steps for Llama-2 7B and 70B shapes in bf16, calibration 128 x 2048
    tokens (8 per forward), refine at 32 x 128; damage uncapped and with ``--max-cache`` 16 GiB.
    ``device_bytes`` is what a GPU must hold; ``host_bytes`` what stays in host memory;
    ``mapped_bytes`` the file pages a ``--low-memory`` step reads weights through (evictable)."""
    run = run or RunSettings(samples=128, seq_len=2048, batch_size=8, eval_batch=1,
                             refine_samples=32, refine_seq_len=128)
    rows = []
    for name, shape in (("7B", llama_7b()), ("70B", llama_70b())):
        capped = RunSettings(**{**run.to_dict(), "max_cache": 16 * GIB})
        costs = [score_damage(shape, run), score_damage(shape, capped), refine(shape, run),
                 compress(shape, run, "wanda"), export(shape, "optimum", None),
                 export_low_memory(shape), export_low_memory(shape, "int8"),
                 export_low_memory(shape, "int8", excluded=shape.vocab * shape.hidden),
                 export_low_memory(shape, "int4"), export_low_memory(shape, fp16=True),
                 evaluate(shape, run, True), evaluate(shape, run, True, low_memory=True)]
        labels = ["score_damage", "score_damage 16G", "refine", "compress_wanda", "export_optimum",
                  "export_onnx --low-memory", "export_onnx --low-memory --quantize int8",
                  "export_onnx --low-memory --quantize int8 --exclude lm_head",
                  "export_onnx --low-memory --quantize int4",
                  "export_onnx --low-memory --dtype float16", "eval_onnx", "eval_onnx --low-memory"]
        for label, cost in zip(labels, costs, strict=True):
            if label.startswith("compress"):  # layer by layer: the model stays on the host, a block visits
                device = cost.device_bytes - shape.weight_bytes + shape.block_linear_params * shape.dtype_bytes
                host = cost.host_bytes + shape.weight_bytes
            elif label.startswith(("export", "eval_onnx")):  # CPU steps in this tool (ORT CPU EP)
                device, host = 0, cost.device_bytes + cost.host_bytes
            else:
                device, host = cost.device_bytes, cost.host_bytes
            rows.append({"model": name, "dtype": "bf16", "step": label, "device_bytes": int(device),
                         "host_bytes": int(host), "mapped_bytes": cost.mapped_bytes, "weight_bytes": shape.weight_bytes,
                         "time_units": round(cost.time_units, 2)})
    return rows
