"""Activation offload: what autograd saves for backward during a forward moves to host memory, and comes back ahead
of its use in backward.

With activation checkpointing the saved tensors outside the recomputed regions are the blocks' inputs (torch's
non-reentrant checkpoint saves them through these hooks) and the head's input, so offload then keeps almost
nothing of the sequence on the GPU; without it every saved activation moves.  Parameters stay where they are, and
so do tensors too small to be worth a copy.

On a GPU the copies run on a side stream: device-to-host as soon as a tensor is saved (the compute stream goes
on), host-to-device for the next `prefetch` tensors whenever backward unpacks one (backward unpacks roughly in
the reverse order of saving).  The host side is pinned memory.  The same code path copies CPU tensors to a second
CPU buffer (no streams), which is how the tests check it on a machine without a GPU; a CPU training run refuses
`train.activation_offload` (trainer/trainer.py), since its activations already live in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks


@dataclass
class _Stash:
    index: int  # position in saving order
    host: torch.Tensor
    device_tensor: torch.Tensor | None = None  # kept until its copy to the host has finished (GPU), then dropped
    copied: torch.cuda.Event | None = None
    fetched: torch.Tensor | None = None  # the device copy, from a prefetch or on demand
    ready: torch.cuda.Event | None = None
    used: bool = False


class ActivationOffload(saved_tensors_hooks):
    """`with ActivationOffload(device): loss = model(...)`; then `loss.backward()` as usual.  One instance per
    forward.  `offloaded_bytes` counts what moved (the tests read it)."""

    def __init__(self, device: torch.device, min_bytes: int = 1 << 16, prefetch: int = 2):
        self.device, self.min_bytes, self.prefetch = torch.device(device), min_bytes, prefetch
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.saved: list[_Stash] = []
        self.in_flight: list[_Stash] = []  # copies to the host not yet known to be finished
        self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _moves(self, t: torch.Tensor) -> bool:
        return (t.device == self.device and not isinstance(t, nn.Parameter)
                and t.untyped_storage().nbytes() >= self.min_bytes)

    def _pack(self, t: torch.Tensor):
        if not self._moves(t):
            return t
        if self.stream is None:
            stash = _Stash(len(self.saved), t.detach().to("cpu", copy=True))
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is fully computed
            with torch.cuda.stream(self.stream):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t.detach(), non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            stash = _Stash(len(self.saved), host, t, copied)  # t must outlive its copy
            self.in_flight = [s for s in self.in_flight if not self._copy_done(s)] + [stash]
        self.saved.append(stash)
        self.offloaded_bytes += t.numel() * t.element_size()
        return stash

    @staticmethod
    def _copy_done(stash: _Stash) -> bool:
        if stash.copied.query():
            stash.device_tensor = None
            return True
        return False

    def _fetch(self, stash: _Stash) -> None:
        if stash.used or stash.fetched is not None or stash.device_tensor is not None:
            return
        if self.stream is None:
            stash.fetched = stash.host.to(self.device, copy=True)
            return
        with torch.cuda.stream(self.stream):
            stash.fetched = stash.host.to(self.device, non_blocking=True)
            stash.ready = torch.cuda.Event()
            stash.ready.record(self.stream)

    def _unpack(self, packed):
        if not isinstance(packed, _Stash):
            return packed
        stash = packed
        for ahead in self.saved[max(stash.index - self.prefetch, 0):stash.index][::-1]:
            self._fetch(ahead)
        if stash.device_tensor is not None:  # its copy out may still be running: the original is still here
            return stash.device_tensor
        stash.used = False  # (a tensor unpacked twice is fetched again)
        self._fetch(stash)
        tensor, stash.fetched, stash.used = stash.fetched, None, True
        if stash.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(stash.ready)
            tensor.record_stream(current)  # allocated on the side stream, used and freed on this one
            stash.ready = None
        return tensor
