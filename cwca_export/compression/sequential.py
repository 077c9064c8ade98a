"""Drive a per-block handler over a model: layer by layer, or whole model at once.

Layer by layer (Wanda / SparseGPT / llm-compressor's sequential pipeline): the inputs of
block 0 are captured for the calibration samples, then each block in turn is moved to the
working device, its Linears' input statistics are accumulated over the buffered inputs,
it is compressed, and the *compressed* block's outputs become the next block's inputs. Peak
memory is one block, its statistics and the hidden-state buffer ``(N, L, hidden)``.

Whole model (the baseline): one pass of the dense model with hooks on every block's
Linears; all statistics are held at once, then every block is compressed.

Data-free methods skip the passes and visit the blocks one at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cwca_export.blocks import Block, weight_out_in
from cwca_export.compression.stats import Statistic, sum_across_processes

Handler = Callable[[Block, dict[str, torch.Tensor] | None], dict[str, Any]]


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@dataclass
class BlockInputs:
    """Block 0's inputs for every calibration batch.

    The model gets ``input_ids`` alone (no padding mask), so everything block 0 receives
    besides the hidden states (causal mask, position ids and embeddings) depends only on the
    batch shape; it is kept once per shape, not once per batch (a 4-D eager mask for 128
    sequences of 2048 tokens would otherwise cost gigabytes).

    Attributes:
        hidden: hidden states per batch, each ``(B, L, hidden)``; overwritten by each
            block's outputs as the driver advances.
        shared: per ``(B, L)``: the other positional arguments and the keyword arguments.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    shared: dict[tuple[int, int], tuple[tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=dict
    )

    def batches(self) -> Iterator[tuple[int, torch.Tensor, tuple[Any, ...], dict[str, Any]]]:
        """``(j, hidden, args, kwargs)`` for every batch j."""
        for j, hidden in enumerate(self.hidden):
            args, kwargs = self.shared[tuple(hidden.shape[:2])]
            yield j, hidden, args, kwargs


def _block_prefix(blocks: list[Block]) -> str:
    return blocks[0].name.rpartition(".")[0] + "."


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, prefix: str, device: torch.device) -> Iterator[None]:
    """Temporarily move every parameter and buffer outside the blocks to ``device``."""
    moved: list[tuple[nn.Module, str, bool, torch.device]] = []
    for module_name, module in model.named_modules():
        if (module_name + ".").startswith(prefix):
            continue
        for kind, store in (("param", module._parameters), ("buffer", module._buffers)):
            for name, tensor in store.items():
                if tensor is None or tensor.device == device:
                    continue
                moved.append((module, name, kind == "param", tensor.device))
                if kind == "param":
                    tensor.data = tensor.data.to(device)
                else:
                    store[name] = tensor.to(device)
    try:
        yield
    finally:
        for module, name, is_param, original in moved:
            if is_param:
                module._parameters[name].data = module._parameters[name].data.to(original)
            else:
                module._buffers[name] = module._buffers[name].to(original)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: list[Block],
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
) -> BlockInputs:
    """Run the model up to block 0 for every batch and record what block 0 receives.

    Only the modules outside the blocks (embeddings, rotary tables, masks) move to
    ``device`` meanwhile; no block runs.
    """
    captured = BlockInputs()

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.hidden.append(hidden.detach())
        captured.shared.setdefault(tuple(hidden.shape[:2]), (rest, kwargs))
        raise _StopForward

    handle = blocks[0].module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _outside_blocks_on(model, _block_prefix(blocks), device):
            for batch in input_ids.split(batch_size):
                # (B, L) ids in; block 0's inputs out through the hook
                with contextlib.suppress(_StopForward):
                    model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@contextlib.contextmanager
def input_statistic_hooks(block: Block, statistic: Statistic, device: torch.device) -> Iterator[dict[str, Any]]:
    """Forward hooks feeding each Linear's inputs ``(tokens, in)`` to the statistic."""
    states: dict[str, Any] = {}
    handles = []
    for path, linear in block.linears.items():
        rel = path[len(block.name) + 1 :]
        states[rel] = statistic.make_empty(weight_out_in(linear).shape[1], device)

        def hook(
            _m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any, rel: str = rel
        ) -> None:
            a = inputs[0].detach()
            statistic.accumulate(states[rel], a.reshape(-1, a.shape[-1]))

        handles.append(linear.register_forward_hook(hook))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def run_block(
    block: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """The hidden states after ``block`` (a decoder block; tuple outputs give their first item)."""
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # GPT-2 blocks return a tuple


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def run_layer_by_layer(
    model: nn.Module,
    blocks: list[Block],
    handler: Handler,
    *,
    statistic: Statistic | None,
    input_ids: torch.Tensor | None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: Callable[[Block], None] | None = None,
) -> list[dict[str, Any]]:
    """Compress block after block; each block's statistics come from the compressed prefix.

    Args:
        model: the causal LM; blocks may live anywhere (CPU, offloaded), each visits ``device``.
        blocks: its decoder blocks, in order.
        handler: ``handler(block, stats) -> report row`` compresses one block in place.
        statistic: the per-Linear statistic the handler needs, or None (no data needed).
        input_ids: calibration ids ``(N, L)`` (ignored without a statistic).
        batch_size: sequences per forward.
        device: where each block is processed; default: where block 0's weights are.
        progress: called with each block once it is done.

    Returns:
        The handler's report rows, in block order.
    """
    device = torch.device(device) if device is not None else _device_of(blocks[0].module)
    inputs = None
    if statistic is not None:
        if input_ids is None:
            raise ValueError("this method needs calibration data; hint: pass --data FILE (Python: data=)")
        inputs = capture_block_inputs(
            model, blocks, input_ids, batch_size=batch_size, device=device
        )
    rows = []
    for i, block in enumerate(blocks):
        home = _device_of(block.module)
        block.module.to(device)
        stats = None
        if inputs is not None:
            with input_statistic_hooks(block, statistic, device) as states:
                for _j, hidden, args, kwargs in inputs.batches():
                    run_block(block.module, hidden, args, kwargs)
            stats = {rel: statistic.finalize(state) for rel, state in states.items()}
        rows.append(handler(block, stats))
        del stats
        if inputs is not None and i + 1 < len(blocks):
            for j, hidden, args, kwargs in inputs.batches():
                inputs.hidden[j] = run_block(block.module, hidden, args, kwargs)
        block.module.to(home)
        if progress is not None:
            progress(block)
    return rows


@torch.no_grad()
def run_whole_model(
    model: nn.Module,
    blocks: list[Block],
    handler: Handler,
    *,
    statistic: Statistic | None,
    input_ids: torch.Tensor | None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: Callable[[Block], None] | None = None,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> list[dict[str, Any]]:
    """The baseline: statistics of every block from one pass of the dense model, then compress.

    Same arguments as :func:`run_layer_by_layer`; the whole model visits ``device``. Under
    data parallelism each process passes its share of ``input_ids`` and ``reduce`` (an
    in-place all-reduce sum): the statistics are summed across processes before they are
    finalized, so every process compresses with the statistics of all the data.
    """
    device = torch.device(device) if device is not None else _device_of(blocks[0].module)
    all_stats: list[dict[str, torch.Tensor] | None] = [None] * len(blocks)
    if statistic is not None:
        if input_ids is None:
            raise ValueError("this method needs calibration data; hint: pass --data FILE (Python: data=)")
        home = _device_of(model)
        model.to(device)
        with contextlib.ExitStack() as stack:
            states = [stack.enter_context(input_statistic_hooks(block, statistic, device)) for block in blocks]
            for batch in input_ids.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
        model.to(home)
        for st in states:
            sum_across_processes(st, reduce)
        all_stats = [{rel: statistic.finalize(s) for rel, s in st.items()} for st in states]
    rows = []
    for block, stats in zip(blocks, all_stats, strict=True):
        home = _device_of(block.module)
        block.module.to(device)
        rows.append(handler(block, stats))
        block.module.to(home)
        if progress is not None:
            progress(block)
    return rows
