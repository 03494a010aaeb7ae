"""Sharding compress over ``torch.distributed`` ranks (``torchrun --nproc-per-node N -m rocketkit compress ...``).

Design, chosen so that N ranks write exactly the files one process writes:

- **Every rank runs every block's forward.** The forward of a block over the calibration batches is
  cheap next to its Grams, whitening and profile, so each rank streams all blocks and holds the
  same activations as a single process would, without shipping activations between ranks.
- **Block i belongs to rank i % N.** Only the owner accumulates block i's Grams (hooks on its
  linears), whitens them, profiles its layers (pass 1) and factorizes them (pass 2). The results
  are the same bits a single process computes: the same code on the same inputs with the same
  pinned thread count (``rocketkit.threads``).
- **Results travel through the shared work folder.** Each rank writes its blocks' profiles and
  factorized shards atomically into ``OUT.partial/`` (so a distributed run resumes like a single
  one, even with a different N). After a barrier, rank 0 reads all profiles, solves the MCKP and
  broadcasts the allocation (JSON bytes over a tensor broadcast; nothing is pickled). After the
  second pass and a barrier, rank 0 writes the non-block weights, config.json with the rocketkit
  section and the index, then renames the folder to OUT.
- **Backends.** gloo when the device is the CPU, NCCL on CUDA (each rank uses ``cuda:LOCAL_RANK``).
  Multi-node runs work the same way, with the output folder on a file system all nodes share.
  A rank that fails makes torchrun stop the others; the work folder stays resumable.

Run without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op single rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch

# Ranks wait for each other at barriers (the slowest rank's last block, rank 0's evaluation).
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass
class Comm:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live
    owns_group: bool = False  # this object initialized the process group and tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owner(self, block: int) -> int:
        return block % self.world

    def owns(self, block: int) -> bool:
        return self.owner(block) == self.rank

    def barrier(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """``data`` from rank ``src`` on every rank (a length, then the bytes, as uint8 tensors)."""
        if not self.distributed:
            if data is None:
                raise ValueError("broadcast_bytes: the source rank must pass data")
            return data
        import torch.distributed as dist

        if self.rank == src and data is None:
            raise ValueError("broadcast_bytes: the source rank must pass data")
        n = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src)
        size = int(n.item())
        if size == 0:
            return b""
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src)
        return buf.cpu().numpy().tobytes()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def init_comm(device: str | torch.device = "cpu") -> tuple[Comm, torch.device]:
    """The ranks of this run and the device this rank computes on.

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group (gloo for the CPU, NCCL for
    CUDA; an existing group is reused) and maps ``cuda`` to ``cuda:LOCAL_RANK``. The barrier timeout
    is ``$ROCKETKIT_DIST_TIMEOUT_S`` seconds (default 6 hours)."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    import torch.distributed as dist

    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Comm(device=torch.device("cpu")), device
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA device is visible")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get("ROCKETKIT_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend=backend, timeout=timeout)
        owns = True
    backend = dist.get_backend()
    comm_device = device if backend == "nccl" else torch.device("cpu")
    return Comm(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, backend=backend,
                device=comm_device, owns_group=owns), device
