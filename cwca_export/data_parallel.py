"""Data parallelism for refinement under ``torchrun`` / ``accelerate launch``.

Scoring runs data-parallel through accelerate's ``Accelerator`` (:mod:`cwca_export.scoring`).
Refinement needs less: every process holds the whole model, measures its share of the
calibration batches, and the sums that make up a measurement (cross-entropy and token
counts, the per-Linear input statistics a pruner reads) are all-reduced, so every process
sees the same losses, takes the same decisions and ends with the same plan; the main
process writes it.

The batches are dealt round-robin (batch i to process i mod P): each batch holds the same
sequences as in one process, so a process computes exactly the per-batch sums one process
would, and only the order of the float64 additions differs. The group formed here is gloo and
reduces host copies, so it serves CPU and CUDA runs alike; a group formed earlier (accelerate's
nccl group on GPUs) is used as it is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes (rank 0 of 1 alone).

    Attributes:
        rank: this process's index; 0 is the main process, the one that writes.
        world: how many processes share the work.
        local_rank: its index on this machine (which GPU it uses).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs and shows progress."""
        return self.rank == 0

    def reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` in place across the processes (a no-op in one process)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        # a group formed here is gloo (host copies); one accelerate formed on GPUs is nccl
        where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        for t in tensors:
            buffer = t.detach().to(where, copy=True)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            with torch.no_grad():
                t.copy_(buffer)

    def share(self, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This process's calibration sequences: batches ``rank, rank + world, ...`` of ``input_ids``.

        Split again by ``batch_size`` they give back exactly those batches (a short last batch
        stays last). Raises ValueError when some process would get no batch.
        """
        check_batches(int(input_ids.shape[0]), batch_size, self.world)
        batches = list(input_ids.split(batch_size))
        if self.world == 1:
            return input_ids
        return torch.cat(batches[self.rank :: self.world])

    def require_same(self, values: dict[str, str]) -> None:
        """Refuse, in every process, when the processes hold different ``values`` (see
        :func:`require_same_everywhere`)."""
        if self.world > 1:
            require_same_everywhere(values)

    def device(self, kind: str) -> torch.device:
        """Where this process computes: ``cuda`` is this process's own GPU (``cuda:local_rank``)."""
        if kind == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device(kind)


def check_batches(sequences: int, batch_size: int, world: int) -> None:
    """Refuse a split that leaves a process without a batch (one line naming the flag to change)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    batches = -(-sequences // batch_size)
    if batches < world:
        raise ValueError(
            f"--batch-size {batch_size}: {sequences} calibration sequences make {batches}"
            f" batch{'es' if batches != 1 else ''} for {world} processes;"
            f" pass --batch-size {max(1, sequences // world)} (or more --samples)"
        )


def require_same_everywhere(values: dict[str, str]) -> None:
    """Refuse, in every process at once, when the processes hold different ``values``.

    ``values`` maps what is compared (``--data``, the model) to this process's digest of it.
    Each process reads its own files, so a calibration file or model folder that differs
    between them (another host's copy, a file rewritten while the processes started) would
    give sums over mixed data under one process's provenance, not one process's result. A
    no-op without a process group of two or more.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    for what, mine in gathered[0].items():
        other = next((r for r, held in enumerate(gathered) if held is None or held.get(what) != mine), None)
        if other is not None:
            raise ValueError(
                f"{what}: process {other} read other contents than process 0 ({gathered[other].get(what)}"
                f" against {mine}); every process must read the same files; hint: give every process the"
                f" same {what} (one copy on a shared disk, or identical copies)")


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@contextlib.contextmanager
def joined_processes() -> Iterator[Processes]:
    """Join the process group ``torchrun`` / ``accelerate launch`` describe in the environment.

    One process without a launcher. A group this call forms (gloo) is torn down on the way
    out; one formed earlier (by accelerate, by the caller) is left as it was.
    """
    world = launched_processes()
    if world <= 1:
        yield Processes()
        return
    import torch.distributed as dist

    formed = not dist.is_initialized()
    if formed:
        dist.init_process_group("gloo")
    finished = False
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        finished = True
    finally:
        if formed:
            if finished:  # nobody tears its connections down while another process still uses them
                dist.barrier()
            dist.destroy_process_group()
