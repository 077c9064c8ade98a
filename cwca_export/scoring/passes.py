"""One pass over the calibration data, with taps on every block Linear.

The pass is the only place that runs the model. Estimators hand it callbacks:

- ``on_grad(block, linear, g)``: a weight's gradient ``(out, in)`` in fp32, delivered by a
  post-accumulate hook the moment autograd has it; the gradient is freed right after, so a
  backward never holds more than one layer's gradient and the rest of the model (embeddings,
  norms, head, biases) gets none at all;
- ``on_sample_grad(block, linear, b, g)``: each sequence's own gradient ``(out, in)``, ``b``
  its position in the batch. With batch size 1 it is ``on_grad``'s gradient; with larger
  batches the weights stay frozen and the taps build sequence b's gradient as
  s_b^T a_b from the layer's input a_b ``(L, in)`` and output gradient s_b ``(L, out)``
  (the per-sample-gradient identity Opacus and BackPACK use): one forward and backward
  serve the whole batch, and since a causal LM's loss is a sum of per-sequence losses,
  s_b is sequence b's own dl_b/d(output). Linears that see tokens without the batch axis
  (mixture-of-experts routing, :func:`routes_tokens`) cannot be split that way: scoring runs
  those models at batch size 1, and a pass that meets such a Linear stops with an error;
- ``on_input(block, linear, a)``: the layer's input ``(tokens, in)`` in the forward;
- ``on_output_grad(block, linear, s)``: dl/d(output) ``(tokens, out)`` in the backward.

Under data parallelism each process walks its own shard and estimators sum their
accumulators with :meth:`ScoringRun.reduce_sum`.

Offloaded weights (accelerate ``device_map`` / ``max_memory``: a Linear's weight lives on
``meta`` and its offload hook streams it in for each forward) never hold a gradient. For
them the taps rebuild it as s^T a from the layer's input a ``(tokens, in)`` and output
gradient s ``(tokens, out)`` and hand it to ``on_grad`` like any other; the input
embeddings' output is made to require grad so the backward reaches every block.
:meth:`ScoringRun.weight` reads an offloaded weight's real values from the offload store
(obd's theta, owl's |W|).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cwca_export.blocks import Block, is_conv1d

GradFn = Callable[[int, str, torch.Tensor], None]
SampleGradFn = Callable[[int, str, int, torch.Tensor], None]  # (block, linear, position in batch, g)


@dataclass
class ScoringRun:
    """Everything an estimator may use: the model, its blocks, the local data shard, settings.

    Attributes:
        model: the causal LM (eval mode; gradient checkpointing already enabled if asked).
        blocks: decoder blocks in order.
        calibration: this process's calibration sequences ``(n_local, L)``.
        held_out: this process's held-out sequences ``(m_local, L)`` or None.
        num_samples: N, calibration sequences over all processes.
        num_held_out: M, held-out sequences over all processes.
        damping: delta (relative mode) or lambda itself (absolute mode).
        damping_mode: ``"relative"`` (lambda_k = delta * mean diagonal) or ``"absolute"``.
        options: the estimator's resolved options.
        accelerator: the ``accelerate.Accelerator`` driving devices and mixed precision.
        batch_size: sequences per forward/backward; per-sequence estimators get each
            sequence's gradient from ``on_sample_grad`` at any batch size.
        progress: show a tqdm bar on the main process.
        checkpoint: saves the passes' accumulators (``state=``) every N sequences and
            restores them on resume; every pass of a checkpointed run must hand its state.
    """

    model: nn.Module
    blocks: list[Block]
    calibration: torch.Tensor  # (n_local, L)
    held_out: torch.Tensor | None  # (m_local, L)
    num_samples: int
    num_held_out: int
    damping: float
    damping_mode: str
    options: dict[str, Any]
    accelerator: Any
    batch_size: int = 1
    progress: bool = True
    checkpoint: Any = None  # a cwca_export.scoring.checkpoint.ScoreCheckpoint, or None
    passes: int = field(default=0, init=False)  # sequences through the model, all passes
    pass_count: int = field(default=0, init=False)  # passes begun, to match them with a checkpoint
    # id(Linear) -> (offload store, key of its weight) for block Linears whose weight is streamed
    streamed: dict[int, tuple[Any, str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        sources = offload_sources(self.model)
        for _, _, module in self.linears():
            if module._parameters["weight"].device.type == "meta" and id(module) in sources:
                self.streamed[id(module)] = sources[id(module)]

    @property
    def device(self) -> torch.device:
        """Where accumulators live: the accelerator's device."""
        return self.accelerator.device

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the embedding's device (differs under a device_map)."""
        weight = self.model.get_input_embeddings().weight
        return self.device if weight.device.type == "meta" else weight.device

    def linears(self) -> Iterator[tuple[int, str, nn.Module]]:
        """``(block index, linear path, module)`` for every block Linear, in order."""
        for block in self.blocks:
            for name, module in block.linears.items():
                yield block.index, name, module

    def damping_for(self, mean_diagonal: float) -> float:
        """lambda_k: ``damping * mean_diagonal`` (relative) or ``damping`` (absolute)."""
        return self.damping * mean_diagonal if self.damping_mode == "relative" else self.damping

    def reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors in place across processes (a no-op in one process)."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def _split(self, split: str) -> torch.Tensor:
        data = self.calibration if split == "calibration" else self.held_out
        if data is None:
            raise ValueError(f"this method needs a {split} split; pass held_out > 0")
        return data

    def begin_pass(self, split: str, state: Any) -> tuple[int, int]:
        """Number a new pass; with a checkpoint, restore ``state`` and say where to go on.

        Returns ``(pass index, sequences already done)``; done equal to the split's size means
        the whole pass was restored and nothing is left to run.
        """
        index = self.pass_count
        self.pass_count += 1
        if self.checkpoint is None:
            return index, 0
        if state is None:
            raise ValueError(
                "this estimator keeps accumulators the checkpoint cannot save; run without --checkpoint-every")
        total = int(self._split(split).shape[0])
        done = self.checkpoint.restore(index, state, total)
        self.passes += done  # those sequences went through the model in the interrupted run
        return index, done

    def end_batch(self, index: int, done: int) -> None:
        """A batch of pass ``index`` is accumulated: ``done`` sequences so far (checkpoints)."""
        if self.checkpoint is not None:
            self.checkpoint.progress(index, done)

    def losses(
        self, split: str = "calibration", *, desc: str = "scoring", skip: int = 0, frozen: bool = False
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(local sample indices, summed per-sequence loss)`` for each batch of ``split``.

        Block Linear weights require grad during the loop and nothing else does; the caller
        runs the backward it needs. The loss of a batch is sum_n l_n, each l_n the mean
        next-token cross-entropy of sequence n, so gradients are per-sequence sums. ``skip``
        sequences at the start are left out (a resumed pass). ``frozen``: no weight requires
        grad (the taps rebuild every gradient, as for per-sequence gradients in a batch); the
        embeddings' output does, so the backward still reaches every block.
        """
        from cwca_export.progress import bar as progress_bar

        data = self._split(split)
        # streamed weights stay frozen: their gradients are rebuilt by the taps, and a copy
        # that required grad would keep a gradient alive per layer until the step ends
        weights = [] if frozen else [m.weight for _, _, m in self.linears() if id(m) not in self.streamed]
        saved = {p: p.requires_grad for p in self.model.parameters()}
        checkpointing = bool(getattr(self.model, "is_gradient_checkpointing", False))
        bar = progress_bar(
            total=int(data.numel()), unit="tok", unit_scale=True, desc=f"{desc} ({split})",
            show=self.progress and self.accelerator.is_main_process,
        )
        handle = None
        try:
            for p in saved:
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
            if self.streamed or frozen:
                # nothing upstream of a streamed block may require grad: start the graph here
                handle = self.model.get_input_embeddings().register_forward_hook(_require_grad)
            if checkpointing:
                # transformers checkpoints a block only in training mode; flag the blocks
                # alone so attention and dropout submodules stay in eval mode.
                for block in self.blocks:
                    block.module.training = True
            bar.update(skip * data.shape[1])
            for start in range(skip, data.shape[0], self.batch_size):
                batch = data[start : start + self.batch_size].to(self.input_device)  # (B, L)
                with self.accelerator.autocast():
                    out = self.model(input_ids=batch, labels=batch, use_cache=False)
                # transformers averages over all B*(L-1) tokens; times B gives sum_n l_n.
                yield list(range(start, start + batch.shape[0])), out.loss.float() * batch.shape[0]
                self.passes += batch.shape[0]
                bar.update(batch.numel())
        finally:
            bar.close()
            if handle is not None:
                handle.remove()
            for p, flag in saved.items():
                p.requires_grad_(flag)
            if checkpointing:
                for block in self.blocks:
                    block.module.training = False

    def gradient_pass(
        self,
        split: str = "calibration",
        *,
        on_grad: GradFn | None = None,
        on_input: GradFn | None = None,
        on_output_grad: GradFn | None = None,
        on_sample_grad: SampleGradFn | None = None,
        on_batch_end: Callable[[list[int]], None] | None = None,
        desc: str = "scoring",
        state: Any = None,
    ) -> None:
        """Forward and backward every batch of ``split``, feeding the taps; see the module doc.

        ``state``: the accumulators the callbacks add to, saved and restored by a checkpoint.
        ``on_sample_grad`` excludes ``on_grad``: a pass delivers either per-sequence gradients
        or the batch's summed ones.
        """
        per_sample = None
        if on_sample_grad is not None:
            if on_grad is not None:
                raise ValueError("gradient_pass: pass on_grad or on_sample_grad, not both")
            if self.batch_size == 1:  # autograd's own gradient is the sequence's gradient
                on_grad = functools.partial(_first_in_batch, on_sample_grad)
            else:
                per_sample = on_sample_grad
        index, done = self.begin_pass(split, state)
        if done == int(self._split(split).shape[0]):
            return
        with _taps(self, on_grad, on_input, on_output_grad, per_sample) as end_step:
            for indices, loss in self.losses(split, desc=desc, skip=done, frozen=per_sample is not None):
                loss.backward()
                end_step()
                if on_batch_end is not None:
                    on_batch_end(indices)
                self.end_batch(index, indices[-1] + 1)

    @torch.no_grad()
    def forward_pass(
        self, split: str = "calibration", *, on_input: GradFn, desc: str = "scoring", state: Any = None
    ) -> None:
        """Forward only (no graph), feeding ``on_input``; ``state`` as in :meth:`gradient_pass`."""
        from cwca_export.progress import bar as progress_bar

        data = self._split(split)
        index, done = self.begin_pass(split, state)
        bar = progress_bar(
            total=int(data.numel()), unit="tok", unit_scale=True, desc=f"{desc} ({split})",
            show=self.progress and self.accelerator.is_main_process, initial=done * data.shape[1],
        )
        with _taps(self, None, on_input, None) as end_step:
            for start in range(done, data.shape[0], self.batch_size):
                batch = data[start : start + self.batch_size].to(self.input_device)
                with self.accelerator.autocast():
                    self.model(input_ids=batch, use_cache=False)
                end_step()
                self.passes += batch.shape[0]
                bar.update(batch.numel())
                self.end_batch(index, start + batch.shape[0])
        bar.close()

    def weight(self, module: nn.Module) -> torch.Tensor:
        """A block Linear's weight ``(out, in)`` with its real values, also when it is offloaded.

        An offloaded weight is read from accelerate's offload store (CPU memory or disk), one
        weight per call; estimators that need theta (obd, owl) read it through here.
        """
        from cwca_export.blocks import weight_out_in

        if id(module) not in self.streamed:
            return weight_out_in(module)
        store, key = self.streamed[id(module)]
        real = store[key].detach().to(module._parameters["weight"].dtype)
        return real.t() if is_conv1d(module) else real


_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def routes_tokens(model: nn.Module) -> bool:
    """Whether the model routes tokens to experts (mixture-of-experts): its expert Linears then
    see a gathered set of tokens with no batch axis, so per-sequence gradients cannot be
    split from a batch (``on_sample_grad`` runs batch size 1 there)."""
    config = getattr(model, "config", None)
    return any(isinstance(getattr(config, key, None), int) and getattr(config, key) > 1 for key in _EXPERT_COUNTS)


def offload_sources(model: nn.Module) -> dict[int, tuple[Any, str]]:
    """``id(module) -> (offload store, key of its weight)`` for modules accelerate streams in.

    Covers a hook on the module itself and a hook on an ancestor that places its submodules.
    """
    sources: dict[int, tuple[Any, str]] = {}
    for _, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", (hook,)):  # a SequentialHook chains several
            if h is None or not getattr(h, "offload", False) or getattr(h, "weights_map", None) is None:
                continue
            subs = module.named_modules() if getattr(h, "place_submodules", False) else [("", module)]
            for prefix, sub in subs:
                sources.setdefault(id(sub), (h.weights_map, f"{prefix}.weight" if prefix else "weight"))
    return sources


def _first_in_batch(on_sample_grad: SampleGradFn, k: int, name: str, g: torch.Tensor) -> None:
    on_sample_grad(k, name, 0, g)


def _require_grad(module: nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


@contextlib.contextmanager
def _taps(
    run: ScoringRun,
    on_grad: GradFn | None,
    on_input: GradFn | None,
    on_output_grad: GradFn | None,
    per_sample: SampleGradFn | None = None,
) -> Iterator[Callable[[], None]]:
    """Install the hooks; yields ``end_step()``, to call once a batch's backward is done.

    With ``per_sample`` every Linear is treated like a streamed one (its gradient rebuilt
    from a and s) and the rebuild is split by sequence.
    """
    handles = []
    seen: set[int] = set()  # Linears already tapped this step: checkpointing re-runs forwards
    # streamed Linears: their gradient s^T a needs a and s, whichever arrives second builds it
    inputs: dict[int, torch.Tensor] = {}  # a (tokens, in) waiting for its s
    output_grads: dict[int, torch.Tensor] = {}  # s (tokens, out) waiting for its a
    checkpointing = bool(getattr(run.model, "is_gradient_checkpointing", False))
    batches = [0]  # sequences in the current batch (per_sample), from the embeddings' input ids
    tokens_per_sequence = [0]

    def count_batch(module: nn.Module, args: tuple) -> None:
        ids = args[0]
        batches[0], tokens_per_sequence[0] = int(ids.shape[0]), int(ids[0].numel())

    def deliver_grad(k: int, name: str, module: nn.Module):
        def hook(p: torch.Tensor) -> None:
            if on_grad is not None:
                g = p.grad.detach()
                on_grad(k, name, (g.t() if is_conv1d(module) else g).float())  # (out, in)
            p.grad = None  # release at once: per-sequence gradients are never kept

        return hook

    def rebuild(k: int, name: str, s: torch.Tensor, a: torch.Tensor) -> None:
        if per_sample is None:
            with torch.no_grad():
                g = s.float().t() @ a.to(s.device).float()  # (out, in), Linear and Conv1D alike
            on_grad(k, name, g)
            return
        batch = batches[0]
        if s.shape[0] != batch * tokens_per_sequence[0] or a.shape[0] != s.shape[0]:
            raise ValueError(
                f"block {k} {name}: its input has {a.shape[0]} token rows for a batch of {batch}"
                " sequences (tokens routed without the batch axis, as in mixture-of-experts), so"
                " per-sequence gradients cannot be split from a batch; hint: pass --batch-size 1"
            )
        with torch.no_grad():
            s3 = s.float().reshape(batch, -1, s.shape[-1])  # (B, L, out)
            a3 = a.to(s.device).float().reshape(batch, -1, a.shape[-1])  # (B, L, in)
            for b in range(batch):
                per_sample(k, name, b, s3[b].t() @ a3[b])  # sequence b's own (out, in) gradient

    def capture_input(k: int, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            # without checkpointing a comes from the step's forward; with it, from the
            # recompute in the backward (the first forward keeps nothing, as checkpointing wants)
            if (id(module) in seen) != checkpointing:
                return
            a = args[0].detach()
            a = a.reshape(-1, a.shape[-1])
            s = output_grads.pop(id(module), None)
            if s is None:
                inputs[id(module)] = a
            else:
                rebuild(k, name, s, a)

        return hook

    def forward_tap(k: int, name: str, streamed: bool):
        def on_s(module: nn.Module, s: torch.Tensor) -> None:
            s = s.detach().reshape(-1, s.shape[-1])
            if on_output_grad is not None:
                on_output_grad(k, name, s.float())
            if streamed:
                a = inputs.pop(id(module), None)
                if a is None:
                    output_grads[id(module)] = s
                else:
                    rebuild(k, name, s, a)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            if on_input is not None:
                a = args[0].detach()
                on_input(k, name, a.reshape(-1, a.shape[-1]).float())  # (tokens, in)
            if (on_output_grad is not None or streamed) and output.requires_grad:
                output.register_hook(lambda s: on_s(module, s))

        return hook

    def end_step() -> None:
        seen.clear()
        inputs.clear()
        output_grads.clear()

    try:
        if per_sample is not None:
            handles.append(run.model.get_input_embeddings().register_forward_pre_hook(count_batch))
        for k, name, module in run.linears():
            streamed = per_sample is not None or (on_grad is not None and id(module) in run.streamed)
            if id(module) not in run.streamed and per_sample is None:
                handles.append(module.weight.register_post_accumulate_grad_hook(deliver_grad(k, name, module)))
            if streamed:
                handles.append(module.register_forward_pre_hook(capture_input(k, name)))
            if on_input is not None or on_output_grad is not None or streamed:
                handles.append(module.register_forward_hook(forward_tap(k, name, streamed)))
        yield end_step
    finally:
        end_step()
        for handle in handles:
            handle.remove()
