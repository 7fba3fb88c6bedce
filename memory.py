"""Will a training run fit in memory? An estimate made before the first step, on the meta device,
and what to change after running out of GPU memory anyway.

Training keeps, per parameter, the float32 weight, its gradient, AdamW's two moments and the EMA
copy (20 bytes), plus the activations autograd saves for the backward pass of one micro-batch.
"""
import functools
import logging
import os

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import model as dis
from data import TensorImages
from distributed import available_memory
from scan import OUR_KERNELS


log = logging.getLogger("dis.train")


class _Created(TorchDispatchMode):
    """Weak references to the storage of every tensor the operations inside create."""

    def __init__(self):
        super().__init__()
        self.storages = []  # (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.storages.append((StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        return out

    def alive(self, but=()):
        """Bytes of the created storages still referenced, each counted once, except those of `but`."""
        skip = {t.untyped_storage()._cdata for t in but}
        alive = {ref.cdata: n for ref, n in self.storages if not ref.expired() and ref.cdata not in skip}
        return sum(alive.values())


def saved_bytes(config, batch):
    """Bytes of the tensors autograd keeps for the backward pass of a training forward of `batch`
    images through DiS(**config), counted on the meta device: shapes only, nothing is computed or
    allocated. What is kept is what the forward pass created and is still referenced once it is
    done (by the autograd graph of the output), so tensors recomputed in the backward pass
    (recompute.py) are not counted."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = dis.DiS(**config, scan_backend="ref")
        with _Created() as created:  # the inputs too: the backward pass may need them
            out = model(torch.zeros(batch, model.in_channels, model.img_size, model.img_size),
                        torch.zeros(batch, dtype=torch.long),
                        torch.zeros(batch, dtype=torch.long) if model.num_classes else None)
        return created.alive(but=[out, *model.parameters()])


@functools.lru_cache(maxsize=None)
def _probe(config_items, depth, batch):
    """saved_bytes of one small probe; a process that checks several runs probes each model once."""
    return saved_bytes({**dict(config_items), "depth": depth}, batch)


def activation_bytes(config, batch):
    """saved_bytes at the config's depth and batch, from four small probes (depth 2 and 4, batch 2
    and 3): the bytes grow linearly with each pair of blocks (one in, one out) and with the batch
    (from 2 on; a batch of 1 is counted as 2)."""
    items = tuple(sorted((k, v) for k, v in config.items() if k != "depth"))
    probes = {(depth, b): _probe(items, depth, b) for depth in (2, 4) for b in (2, 3)}
    pairs = config["depth"] // 2 - 1  # beyond the depth-2 model's
    two, three = (probes[2, b] + pairs * (probes[4, b] - probes[2, b]) for b in (2, 3))
    return two + (max(batch, 2) - 2) * (three - two)


def check_memory(config, args, world, device, data):
    """Refuse a run that clearly will not fit: weights, gradients, AdamW's moments and the EMA
    (20 bytes a parameter), the dataset held on the device and, on the CPU (where running out
    ends the process without a word), the activations autograd keeps for one micro-batch."""
    available = available_memory(device)
    if not args.memory_check or available is None:
        return
    with torch.device("meta"):
        need = 20 * sum(p.numel() for p in dis.DiS(**config, scan_backend="ref").parameters())
    need += data.source.images.nbytes if isinstance(data.source, TensorImages) else 0
    if device.type == "cpu":
        activations = activation_bytes({**config, "recompute_scan_inputs": args.recompute_scan_inputs},
                                       args.global_batch_size // (world * args.grad_accum_steps))
        if args.grad_checkpointing:  # block inputs, and one block's activations while it is recomputed
            activations = activations * 2 // (config["depth"] + 1)
        need = (need + activations) * int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # its processes share the RAM
    where = "of GPU memory" if device.type == "cuda" else "of RAM"
    log.info(f"Memory: about {need / 2**30:.2f} GiB needed, {available / 2**30:.1f} GiB {where} available")
    if need > available:
        raise SystemExit(f"this run needs about {need / 2**30:.1f} GiB {where}, {available / 2**30:.1f} GiB are "
                         f"available: lower --global-batch-size, use a smaller --model, --embed-dim or --depth, a "
                         f"larger patch (DiS-S/4, DiS-S/8) or --grad-checkpointing (or skip this: --no-memory-check)")
    if available < 1.5 * need:  # temporaries of the backward pass come on top
        log.warning("this run may not fit in memory; if it is stopped for it, lower --global-batch-size")


def scan_states_bytes(model, micro_batch, bytes_per_value):
    """Bytes of the chunk states our scans keep with save_every=1 for one micro-batch: per mixer
    (micro_batch, 2 directions, ceil(L / 4) chunks, E, 16 states), `bytes_per_value` each."""
    chunks = -(-model.pos_embed.shape[1] // 4)
    return sum(micro_batch * 2 * chunks * m.D.shape[0] * 16 * bytes_per_value
               for m in model.modules() if isinstance(m, dis.BiMamba))


def keep_scan_states(model, micro_batch, bytes_per_value, device, checkpointed=False, share=0.8):
    """--scan-save-every auto, after the first training step, which ran keeping no chunk state
    (save_every=0): if that step's peak plus every chunk state (one block's with gradient
    checkpointing, which recomputes and differentiates one block at a time) fits in `share` of
    the GPU memory this process can have, set save_every=1 on every mixer (a faster step;
    bitwise the same gradients). Returns the log line that says which, with the figures."""
    mixers = [m for m in model.modules() if isinstance(m, dis.BiMamba)]
    states = scan_states_bytes(model, micro_batch, bytes_per_value) // (len(mixers) if checkpointed else 1)
    peak = torch.cuda.max_memory_allocated(device)
    usable = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)  # free + held by this process
    keep = peak + states <= share * usable
    if keep:
        for m in mixers:
            m.scan_save_every = 1
    outcome = "fit" if keep else "do not fit"
    then = "they are kept from now on (faster)" if keep else "the backward pass keeps recomputing them"
    return (f"Memory: the first step's peak was {peak / 2**30:.1f} GiB; the scans' chunk states "
            f"({states / 2**30:.1f} GiB) {outcome} in {share:.0%} of the GPU's {usable / 2**30:.1f} GiB, so {then}")


def oom_advice(args, backend):
    """What to change after running out of GPU memory, for this run's settings, cheapest first:
    --scan-save-every 0 keeps none of our scans' (Triton, CUDA) chunk states, --no-cuda-graphs
    gives back the few percent a CUDA graph's own memory pool holds over eager steps,
    --recompute-scan-inputs recomputes the mixers' u, --grad-checkpointing recomputes whole
    blocks."""
    advice = ["lower --global-batch-size"]
    if backend in OUR_KERNELS and args.scan_save_every != 0:
        advice.append("use --scan-save-every 0")
    if args.cuda_graphs:
        advice.append("use --no-cuda-graphs")
    if not (args.recompute_scan_inputs or args.grad_checkpointing or args.compile):
        advice.append("add --recompute-scan-inputs")
    if not args.grad_checkpointing:
        advice.append("add --grad-checkpointing")
    if args.precision == "fp32":
        advice.append("use --precision bf16")
    return ", ".join(advice[:-1]) + " or " + advice[-1] if len(advice) > 1 else advice[0]


def out_of_memory(args, world, backend):
    """The SystemExit for a CUDA out-of-memory error: the micro-batch that did not fit and what to change."""
    micro = args.global_batch_size // (world * args.grad_accum_steps)
    return SystemExit(f"CUDA out of memory with {micro} images per GPU ({args.model}, {args.precision}, {backend} "
                      f"scan): add --grad-accum-steps {2 * args.grad_accum_steps} (the same global batch in smaller "
                      f"micro-batches), {oom_advice(args, backend)}")
