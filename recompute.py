"""Activations recomputed in the backward pass instead of kept from the forward pass.

Autograd keeps every tensor a backward formula needs until the backward pass. In DiS's mixer
the largest of them, after the scan's chunk states, are the scan's inputs u and Delta
((B, L, 2, E) each, kept by the scan and by x_proj), and both are cheap to recompute from
in_proj's x, which is kept anyway (the convolution's backward needs it):

    with Recomputed(enabled) as saved:
        u, x_dbl, delta = saved.compute(scan_inputs, x, drop=(0, 2))
        y = scan(u, delta, ...)

Inside the block, a tensor autograd saves that shares memory with a dropped output of
`compute` (u, delta, or a view of them) is kept as a note instead; the first backward formula
that needs one calls the function again, under the forward pass's autocast state, and all
notes of the block are served from that one recomputation. The function must give the same
values when called again (no randomness, parameters unchanged until the backward pass).

It trades time for memory (BENCHMARKS.md has both), so DiS does it only when asked:
`train.py --recompute-scan-inputs`, the mixers' recompute_scan_inputs.
"""
import contextlib

import torch


def _storage(tensor):
    """Which memory a tensor views: its storage's identity, unique while the storage lives (the
    data address is not: it is 0 for every tensor on the meta device)."""
    return tensor.untyped_storage()._cdata


class _Note:
    """A saved tensor: the tensor itself, or (once dropped) which output it views and how."""
    __slots__ = ("tensor", "index", "shape", "stride", "offset")

    def __init__(self, tensor):
        self.tensor, self.index = tensor, None
        self.shape, self.stride, self.offset = tensor.shape, tensor.stride(), tensor.storage_offset()


class Recomputed:
    """saved_tensors_hooks that drop some outputs of one function call from what autograd keeps
    and recompute them in the backward pass (see the module docstring)."""

    def __init__(self, enabled=True):
        self._enabled = enabled  # False: compute() only calls the function, autograd keeps everything
        self._hooks = None    # while active: the saved_tensors_hooks (they refer back to self)
        self._dropped = {}    # storage of a dropped output -> its index among the outputs
        self._pending = None  # while the function runs: notes taken before its outputs are known
        self._recipe = None   # (function, args, autocast state) of the call to repeat
        self._values = None   # the recomputed outputs, once the backward pass has asked for them

    def __enter__(self):
        if self._enabled and torch.is_grad_enabled():  # without autograd nothing is saved
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
        if self._hooks is None:  # disabled, or no autograd: nothing to drop
            return fn(*args)
        device = args[0].device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        self._recipe = fn, args, (device, autocast, torch.get_autocast_dtype(device) if autocast else None)
        self._pending = []
        outputs = fn(*args)
        self._dropped = {_storage(outputs[i]): i for i in drop}
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
        index = self._dropped.get(_storage(note.tensor))
        if index is not None:
            note.tensor, note.index = None, index

    def _unpack(self, note):
        if note.tensor is not None:
            return note.tensor
        if self._values is None:
            fn, args, (device, autocast, dtype) = self._recipe
            with torch.no_grad(), torch.autocast(device, dtype=dtype) if autocast else contextlib.nullcontext():
                self._values = fn(*args)
        return self._values[note.index].as_strided(note.shape, note.stride, note.offset)
