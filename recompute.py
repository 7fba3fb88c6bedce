"""Activations recomputed in the backward pass instead of kept from the forward pass.

Autograd keeps every tensor a backward formula needs until the backward pass. In DiS's mixer
the largest of them, once the scan keeps no chunk states, are the scan's inputs u and Delta
((B, L, 2, E) each, kept by the scan and by x_proj). Delta is dt_proj's output, a GEMM of rank
R from its ranks, part of x_proj's output (kept anyway: B and C are views of it), so
recomputing it costs little; u is the convolution's output, recomputed from in_proj's output xz
(kept anyway for the convolution's backward pass) at the cost of the convolution and x_proj
again:

    with Recomputed() as saved:
        u, x_dbl, z = saved.compute(conv_and_x_proj, xz, drop=(0,))  # only when asked
        delta, = saved.compute(dt_proj, x_dbl[..., :R], drop=(0,))
        y = scan(u, delta, ...)

Inside the block, a tensor autograd saves that shares memory with a dropped output of a
`compute` call (or a view of one) is kept as a note instead; the first backward formula that
needs one calls that function again, under the forward pass's autocast state, and all notes of
the call are served from that one recomputation. The function must give the same values when
called again (no randomness, parameters unchanged until the backward pass).

DiS always recomputes Delta; u only with `train.py --recompute-scan-inputs` (the mixers'
recompute_scan_inputs), which trades time for memory (BENCHMARKS.md has both). Under
torch.compile nothing is dropped here: the compiler's partitioner chooses what to recompute;
nor inside gradient checkpointing, which recomputes the whole block anyway.
"""
import contextlib

import torch


def _storage(tensor):
    """Which memory a tensor views: its storage's identity, unique while the storage lives (the
    data address is not: it is 0 for every tensor on the meta device)."""
    return tensor.untyped_storage()._cdata


class _Note:
    """A saved tensor: the tensor itself, or (once dropped) which output of which call it views and how."""
    __slots__ = ("tensor", "output", "shape", "stride", "offset")

    def __init__(self, tensor):
        self.tensor, self.output = tensor, None
        self.shape, self.stride, self.offset = tensor.shape, tensor.stride(), tensor.storage_offset()


class Recomputed:
    """saved_tensors_hooks that drop some outputs of function calls from what autograd keeps
    and recompute them in the backward pass (see the module docstring)."""

    def __init__(self, enabled=True):
        self._enabled = enabled  # False: compute() only calls the function, autograd keeps everything
        self._hooks = None    # while active: the saved_tensors_hooks (they refer back to self)
        self._dropped = {}    # storage of a dropped output -> (call, its index among the outputs)
        self._pending = None  # while a function runs: notes taken before its outputs are known
        self._recipes = []    # per compute() call that drops something: (function, args, autocast state)
        self._values = {}     # call -> its recomputed outputs, once the backward pass has asked for them

    def __enter__(self):
        # Without autograd nothing is saved. Under torch.compile the compiler chooses what to keep
        # and what to recompute (its partitioner), and hooks would break its graph at every block.
        # Inside other saved-tensor hooks (gradient checkpointing's, offloading's) those decide:
        # hooks do not compose, and ours, the innermost, would keep what checkpointing discards.
        if (self._enabled and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and torch._C._autograd._top_saved_tensors_default_hooks(False) is None):
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None  # without the cycle through it, self goes with the autograd graph

    def compute(self, fn, *args, drop):
        """fn(*args), a tuple of tensors; the outputs at the indices `drop` are not kept for the
        backward pass by anything computed from here to the end of the `with` block."""
        if self._hooks is None or not drop:  # disabled, no autograd, or nothing to drop
            return fn(*args)
        device = args[0].device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        call = len(self._recipes)
        self._recipes.append((fn, args, (device, autocast, torch.get_autocast_dtype(device) if autocast else None)))
        self._pending = []
        outputs = fn(*args)
        self._dropped.update({_storage(outputs[i]): (call, i) for i in drop})
        pending, self._pending = self._pending, None
        for note in pending:
            self._settle(note)
        return outputs

    def _pack(self, tensor):
        note = _Note(tensor)
        if self._pending is not None:
            self._pending.append(note)
        else:
            self._settle(note)
        return note

    def _settle(self, note):
        output = self._dropped.get(_storage(note.tensor))
        if output is not None:
            note.tensor, note.output = None, output

    def _unpack(self, note):
        if note.tensor is not None:
            return note.tensor
        call, index = note.output
        if call not in self._values:
            fn, args, (device, autocast, dtype) = self._recipes[call]
            with torch.no_grad(), torch.autocast(device, dtype=dtype) if autocast else contextlib.nullcontext():
                self._values[call] = fn(*args)
        return self._values[call][index].as_strided(note.shape, note.stride, note.offset)
