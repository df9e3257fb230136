"""Activation offload: what autograd saves for backward during a forward moves to host memory, and comes back ahead
of its use in backward.

With activation checkpointing the saved tensors outside the recomputed regions are the blocks' inputs (torch's
non-reentrant checkpoint saves them through these hooks) and the head's input, so offload then keeps almost
nothing of the sequence on the GPU; without it every saved activation moves.  Weights stay where they are (a
parameter, a view of one, or autocast's cast copy of one: FSDP2 frees and re-gathers those itself), and so do
tensors too small to be worth a copy.

On a GPU the copies run on one side stream per device: device-to-host as soon as a tensor is saved (the compute
stream goes on; `record_stream` keeps the allocator from reusing the tensor's memory before the copy has read
it), host-to-device for the next `prefetch` tensors whenever backward unpacks one (backward unpacks roughly in
the reverse order of saving).  The host side is pinned memory.  The same code path copies CPU tensors to a second
CPU buffer (no streams), which is how the tests check it on a machine without a GPU; a CPU training run refuses
`train.activation_offload` (trainer/trainer.py), since its activations already live in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # one copy stream per device, reused by every forward


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def is_weight(t: torch.Tensor) -> bool:
    """A parameter, a view of one (a linear layer saves `weight.t()`), or autocast's cast copy of one."""
    base = t._base if t._base is not None else t
    if isinstance(base, nn.Parameter):
        return True
    fn = base.grad_fn
    if fn is not None and type(fn).__name__ == "ToCopyBackward0" and fn.next_functions:
        source = fn.next_functions[0][0]
        return isinstance(getattr(source, "variable", None), nn.Parameter)
    return False


@dataclass
class _Stash:
    index: int  # position in saving order
    host: torch.Tensor
    fetched: torch.Tensor | None = None  # the device copy, from a prefetch or on demand
    ready: torch.cuda.Event | None = None
    used: bool = False


@dataclass
class _State:
    """What the hooks share.  The hooks are closures over this, not methods of the context manager, so nothing
    refers back to itself: host copies are freed with the graph, without waiting for the cycle collector."""

    device: torch.device
    min_bytes: int
    prefetch: int
    stream: torch.cuda.Stream | None
    saved: list[_Stash] = field(default_factory=list)
    offloaded_bytes: int = 0

    def moves(self, t: torch.Tensor) -> bool:
        return t.device == self.device and t.untyped_storage().nbytes() >= self.min_bytes and not is_weight(t)

    def pack(self, t: torch.Tensor):
        if not self.moves(t):
            return t
        if self.stream is None:
            host = t.detach().to("cpu", copy=True)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is fully computed
            with torch.cuda.stream(self.stream):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t.detach(), non_blocking=True)
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        stash = _Stash(len(self.saved), host)
        self.saved.append(stash)
        self.offloaded_bytes += t.numel() * t.element_size()
        return stash

    def fetch(self, stash: _Stash) -> None:
        if stash.used or stash.fetched is not None:
            return
        if self.stream is None:
            stash.fetched = stash.host.to(self.device, copy=True)
            return
        with torch.cuda.stream(self.stream):  # after the copy out, which ran on this stream
            stash.fetched = stash.host.to(self.device, non_blocking=True)
            stash.ready = torch.cuda.Event()
            stash.ready.record(self.stream)

    def unpack(self, packed):
        if not isinstance(packed, _Stash):
            return packed
        stash = packed
        for ahead in self.saved[max(stash.index - self.prefetch, 0):stash.index][::-1]:
            self.fetch(ahead)
        stash.used = False  # (a tensor unpacked twice is fetched again)
        self.fetch(stash)
        tensor, stash.fetched, stash.used = stash.fetched, None, True
        if stash.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(stash.ready)
            tensor.record_stream(current)  # allocated on the side stream, used and freed on this one
            stash.ready = None
        return tensor


class ActivationOffload(saved_tensors_hooks):
    """`with ActivationOffload(device): loss = model(...)`; then `loss.backward()` as usual.  One instance per
    forward.  `offloaded_bytes` counts what moved (the tests read it)."""

    def __init__(self, device: torch.device, min_bytes: int = 1 << 16, prefetch: int = 2):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.state = _State(device, min_bytes, prefetch, _copy_stream(device) if device.type == "cuda" else None)
        state = self.state
        super().__init__(lambda t: state.pack(t), lambda packed: state.unpack(packed))

    @property
    def offloaded_bytes(self) -> int:
        return self.state.offloaded_bytes
