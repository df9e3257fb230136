"""What every Triton kernel here shares: when the Triton backend can run, and autotuning that also works under
the CPU interpreter.

`TRITON_INTERPRET=1` (read by Triton when a kernel is decorated, so set it before the kernel modules are
imported) runs kernels on CPU tensors, exactly and slowly: that is how CI checks them.  `triton.autotune`
benchmarks candidate configs on a GPU and so cannot run under the interpreter; `autotune` below then launches
the first config instead.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with Linux x86_64 torch wheels
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton backend can run on these tensors: CUDA tensors, or any tensors under the interpreter."""
    if triton is None:
        return False
    return interpreting() or all(t.is_cuda for t in tensors)


def require_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if not triton_usable(*tensors):
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before hylo's kernels "
                           "are imported to run the kernels on the CPU interpreter")


def output_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a kernel's output; filled with NaN when HYLO_POISON=1, so tests catch any element a kernel
    never writes."""
    if os.environ.get("HYLO_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def contiguous_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/seq/head strides but step along the last dim one element at a time."""
    return x if x.stride(-1) == 1 else x.contiguous()


def strides3(x: torch.Tensor) -> tuple[int, int, int]:
    """The first three strides of a (B, T, H, d) tensor, as the kernels take them (the last is 1)."""
    return x.stride(0), x.stride(1), x.stride(2)


def padded_width(n: int) -> int:
    """A contracted dim padded for tl.dot: a power of two, and at least 16 (its minimum on GPUs)."""
    return max(16, 1 << (n - 1).bit_length())


def device_shared_memory_kb() -> float | None:
    """Shared memory one block may use on this GPU, in KB (227 on H100/H200, 163 on A100, 99 on consumer Ampere
    and Ada), for pruning configs that could not launch before they are compiled.  HYLO_SHARED_MEMORY_KB overrides
    it (bench/kernel_report.py prunes for each target that way); None without a GPU."""
    if os.environ.get("HYLO_SHARED_MEMORY_KB"):
        return float(os.environ["HYLO_SHARED_MEMORY_KB"])
    if interpreting() or not torch.cuda.is_available():
        return None
    optin = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "shared_memory_per_block_optin", 0)
    return optin / 1024 if optin else None


class _FirstConfig:
    """Stands in for an autotuned kernel under the interpreter: launches with the first config that survives the
    kernel's own pruning for these arguments (so the interpreter only runs what a GPU could pick)."""

    def __init__(self, fn, configs: list, prune=None):
        self.fn, self.configs, self.prune = fn, configs, prune

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            configs = self.configs
            if self.prune is not None:
                named = dict(zip(self.fn.arg_names, args, strict=False))
                configs = self.prune(configs, {**named, **kwargs}, **kwargs)
            return self.fn[grid](*args, **{**configs[0].kwargs, **kwargs})
        return launch


def lean_autotuning() -> bool:
    """HYLO_AUTOTUNE=lean: autotune among each kernel's one or two lean configs only (the GPU scripts set it, so
    their time goes to measuring, not to compiling every candidate)."""
    return os.environ.get("HYLO_AUTOTUNE", "full") == "lean"


def autotune(configs: list, key: list[str], *, lean: tuple[int, ...] = (0,), **kwargs):
    """`triton.autotune` on a GPU; under the interpreter (which has no benchmarker) the first of `configs` that the
    kernel's pruning keeps.

    `key` names what the best config depends on — head dims, masks, precision — never the sequence lengths: a new
    length neither re-tunes nor (the kernels mark lengths `do_not_specialize`) recompiles.  `lean`: the indices
    of the configs kept with HYLO_AUTOTUNE=lean, chosen from bench/kernel_report.py's table (they fit in shared
    memory on sm_80 and sm_90 with the fewest spills)."""
    def wrap(fn):
        if interpreting():
            return _FirstConfig(fn, configs, (kwargs.get("prune_configs_by") or {}).get("early_config_prune"))
        chosen = [configs[i] for i in lean] if lean_autotuning() else configs
        return triton.autotune(configs=chosen, key=key, **kwargs)(fn)
    return wrap


def traceable(kernel):
    """A kernel as launched inside a `torch.library.triton_op`: through `wrap_triton`, so torch.compile sees (and
    Inductor can optimise) the launch; as is under the interpreter, which compile cannot trace."""
    if interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def kernel_op(name: str):
    """Registers a function that launches Triton kernels as the torch op `name` ("hylo::..."): a
    `torch.library.triton_op` on GPUs (torch.compile keeps it one op, and Inductor sees the kernels through
    `traceable`), an opaque `torch.library.custom_op` under the interpreter (whose kernels compile cannot trace).
    Either way each op registers its fake (shapes only) and, for the forward, its autograd."""
    if interpreting():
        return torch.library.custom_op(name, mutates_args=())
    return torch.library.triton_op(name, mutates_args=())
