"""One pass over the calibration data, with taps on every block Linear.

The pass is the only place that runs the model. Estimators hand it callbacks:

- ``on_grad(block, linear, g)``: a weight's gradient ``(out, in)`` in fp32, delivered by a
  post-accumulate hook the moment autograd has it; the gradient is freed right after, so a
  backward never holds more than one layer's gradient and the rest of the model (embeddings,
  norms, head, biases) gets none at all;
- ``on_input(block, linear, a)``: the layer's input ``(tokens, in)`` in the forward;
- ``on_output_grad(block, linear, s)``: dl/d(output) ``(tokens, out)`` in the backward.

Under data parallelism each process walks its own shard and estimators sum their
accumulators with :meth:`ScoringRun.reduce_sum`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cwca_export.blocks import Block, is_conv1d

GradFn = Callable[[int, str, torch.Tensor], None]


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
        batch_size: sequences per forward/backward (1 for per-sequence estimators).
        progress: show a tqdm bar on the main process.
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
    passes: int = field(default=0, init=False)  # sequences through the model, all passes

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

    def losses(self, split: str = "calibration", *, desc: str = "scoring") -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(local sample indices, summed per-sequence loss)`` for each batch of ``split``.

        Block Linear weights require grad during the loop and nothing else does; the caller
        runs the backward it needs. The loss of a batch is sum_n l_n, each l_n the mean
        next-token cross-entropy of sequence n, so gradients are per-sequence sums.
        """
        from tqdm.auto import tqdm

        data = self._split(split)
        weights = [m.weight for _, _, m in self.linears()]
        saved = {p: p.requires_grad for p in self.model.parameters()}
        checkpointing = bool(getattr(self.model, "is_gradient_checkpointing", False))
        bar = tqdm(
            total=int(data.numel()), unit="tok", unit_scale=True, desc=f"{desc} ({split})",
            disable=not (self.progress and self.accelerator.is_main_process), leave=False,
        )
        try:
            for p in saved:
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
            if checkpointing:
                # transformers checkpoints a block only in training mode; flag the blocks
                # alone so attention and dropout submodules stay in eval mode.
                for block in self.blocks:
                    block.module.training = True
            for start in range(0, data.shape[0], self.batch_size):
                batch = data[start : start + self.batch_size].to(self.input_device)  # (B, L)
                with self.accelerator.autocast():
                    out = self.model(input_ids=batch, labels=batch, use_cache=False)
                # transformers averages over all B*(L-1) tokens; times B gives sum_n l_n.
                yield list(range(start, start + batch.shape[0])), out.loss.float() * batch.shape[0]
                self.passes += batch.shape[0]
                bar.update(batch.numel())
        finally:
            bar.close()
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
        on_batch_end: Callable[[list[int]], None] | None = None,
        desc: str = "scoring",
    ) -> None:
        """Forward and backward every batch of ``split``, feeding the taps; see the module doc."""
        with _taps(self, on_grad, on_input, on_output_grad) as end_step:
            for indices, loss in self.losses(split, desc=desc):
                loss.backward()
                end_step()
                if on_batch_end is not None:
                    on_batch_end(indices)

    @torch.no_grad()
    def forward_pass(self, split: str = "calibration", *, on_input: GradFn, desc: str = "scoring") -> None:
        """Forward only (no graph), feeding ``on_input``."""
        from tqdm.auto import tqdm

        data = self._split(split)
        bar = tqdm(
            total=int(data.numel()), unit="tok", unit_scale=True, desc=f"{desc} ({split})",
            disable=not (self.progress and self.accelerator.is_main_process), leave=False,
        )
        with _taps(self, None, on_input, None) as end_step:
            for start in range(0, data.shape[0], self.batch_size):
                batch = data[start : start + self.batch_size].to(self.input_device)
                with self.accelerator.autocast():
                    self.model(input_ids=batch, use_cache=False)
                end_step()
                self.passes += batch.shape[0]
                bar.update(batch.numel())
        bar.close()


@contextlib.contextmanager
def _taps(
    run: ScoringRun, on_grad: GradFn | None, on_input: GradFn | None, on_output_grad: GradFn | None
) -> Iterator[Callable[[], None]]:
    """Install the hooks; yields ``end_step()``, to call once a batch's backward is done."""
    handles = []
    seen: set[int] = set()  # Linears already tapped this step: checkpointing re-runs forwards

    def deliver_grad(k: int, name: str, module: nn.Module):
        def hook(p: torch.Tensor) -> None:
            if on_grad is not None:
                g = p.grad.detach()
                on_grad(k, name, (g.t() if is_conv1d(module) else g).float())  # (out, in)
            p.grad = None  # release at once: per-sequence gradients are never kept

        return hook

    def forward_tap(k: int, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            if on_input is not None:
                a = args[0].detach()
                on_input(k, name, a.reshape(-1, a.shape[-1]).float())  # (tokens, in)
            if on_output_grad is not None and output.requires_grad:
                output.register_hook(
                    lambda s: on_output_grad(k, name, s.detach().reshape(-1, s.shape[-1]).float())
                )

        return hook

    try:
        for k, name, module in run.linears():
            handles.append(module.weight.register_post_accumulate_grad_hook(deliver_grad(k, name, module)))
            if on_input is not None or on_output_grad is not None:
                handles.append(module.register_forward_hook(forward_tap(k, name)))
        yield seen.clear
    finally:
        for handle in handles:
            handle.remove()
