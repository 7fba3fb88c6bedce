"""Processes and seeds: the process group under torchrun (NCCL on GPUs, gloo on CPU), a barrier,
and seeds derived from several parts, the same in every process and run."""
import contextlib
import hashlib
import os

import torch
import torch.distributed as dist


def derived_seed(*parts):
    """A 63-bit seed from ints and strings, the same in every process, run and Python version."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def process_group(kind="auto"):
    """Context giving (rank, world size, device). Under torchrun: one process per GPU with NCCL,
    or gloo on CPU; otherwise a single process. kind: auto, cpu or cuda. A process group created
    here is destroyed on exit; an existing one is reused and left to its owner."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    cuda = torch.cuda.is_available() and kind != "cpu"
    owns_group = not dist.is_initialized()
    if "RANK" not in os.environ:
        rank, world, device = 0, 1, torch.device("cuda" if cuda else "cpu")
    else:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if owns_group:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        yield rank, world, device
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rank_seed(global_seed, rank, world):
    """DiT's per-rank seed, global_seed * world_size + rank."""
    return global_seed * world + rank


def rng_states(world, device):
    """Every rank's default generator states, gathered on all ranks: [{"cpu", "cuda"}] by rank."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state, device):
    """Restore one rank's default generators from an entry of rng_states."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
