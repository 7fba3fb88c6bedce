"""Processes and seeds: the process group under torchrun (NCCL on GPUs, gloo on CPU), a barrier,
the ranks' agreement on each training step, seeds derived from several parts (the same in every
process and run), the generator states of every rank, the memory a process may use, and stopping
cleanly on SIGINT/SIGTERM."""
import contextlib
import datetime
import functools
import hashlib
import os
import signal
import socket
import threading
from typing import NamedTuple

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


# How long the other ranks wait at a barrier while one rank works alone: the first FID reference
# statistics of a large image folder, a dataset prepared once. Within NCCL's own timeout (10
# minutes by default) such waits would end the run.
BARRIER_TIMEOUT = datetime.timedelta(hours=2)


@functools.cache
def _host_group(world_group):
    """All ranks of the process group `world_group` in a gloo group with BARRIER_TIMEOUT: a
    barrier there waits on the CPU, with no NCCL operation pending."""
    return dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)


def barrier():
    """Every rank waits here for the others, for up to BARRIER_TIMEOUT (whatever the backend)."""
    if dist.is_initialized():
        dist.barrier(group=_host_group(dist.group.WORLD))


class Agreement(NamedTuple):
    loss: float  # mean over ranks
    norm: float
    finite: bool  # loss and gradient finite on every rank
    signalled: bool  # some rank received SIGINT/SIGTERM
    timed_out: bool


def agree(loss, norm, signalled, timed_out, world, device):
    """One all-reduce per step makes every rank agree on skipping a non-finite step and on stopping:
    loss and norm are this rank's 0-dim tensors, signalled and timed_out its bools."""
    nonfinite = ~torch.isfinite(loss) | ~torch.isfinite(norm)
    flags = torch.cat([torch.stack([loss.detach(), norm, nonfinite]).float(),
                       torch.tensor([signalled, timed_out], dtype=torch.float, device=device)])
    if world > 1:
        dist.all_reduce(flags)
    loss_sum, norm_sum, bad, signalled, timed_out = flags.tolist()
    return Agreement(loss_sum / world, norm_sum / world, not bad, bool(signalled), bool(timed_out))


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


def available_memory(device):
    """Bytes this process can still allocate on `device`: free GPU memory, or the RAM Linux
    reports available (within a cgroup's limit when there is one); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                free = min(free, int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return free


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While active (a context manager), SIGINT (Ctrl-C) and SIGTERM ask a loop to stop cleanly.

    The first one sets `received` (its number), which the loop reads between steps, and is
    acknowledged on stderr at once with `message`, even while the main thread is inside a long
    C++ call: Python's C-level handler writes the signal's number to a socket that a watcher
    thread reads. The second one ends the process at once with exit status 128 + its number
    (130 for SIGINT, 143 for SIGTERM); a file being written with storage.write_atomically is then
    left as its .tmp, and the previous version stays complete."""

    def __init__(self, message):
        self.message, self.received, self.active = message, None, False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread; elsewhere signals act as usual
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.previous = {sig: signal.signal(sig, self.ignore) for sig in STOP_SIGNALS}
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()
        self.active = True
        return self

    def ignore(self, signum, frame):
        """The Python-level handler: the watcher thread has acted on the signal already."""

    def watch(self):
        while data := self.reader.recv(1):
            if data[0] not in STOP_SIGNALS:
                continue  # other signals with Python handlers (a DataLoader's SIGCHLD) write here too
            name = signal.Signals(data[0]).name
            if self.received is None:
                self.received = data[0]
                os.write(2, f"\n{name}: {self.message} (send it again to stop at once)\n".encode())
            else:
                os.write(2, f"\n{name} again: stopping at once, exit status {128 + data[0]}\n".encode())
                os._exit(128 + data[0])

    def __exit__(self, *exc):
        if self.active:
            signal.set_wakeup_fd(self.previous_fd)
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.writer.close()  # the watcher reads the end of the stream and returns
            self.watcher.join()
            self.reader.close()
            self.active = False
