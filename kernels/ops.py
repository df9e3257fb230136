"""The public ops, one function each: `from hylo.kernels.ops import attention, rat_attention, ...`.

Each op lives in its own folder (the fla pattern): `naive.py` oracle, `chunk.py` PyTorch path, `triton.py`,
`step.py` recurrent decoding; `hylo.kernels.attention` etc. are those folders (this module binds the names to the
functions, the folders stay importable as packages).  Tensors are (batch, seq, heads, head_dim); `backend=` picks
a path."""

from hylo.kernels.attention import attention, attention_prefill, attention_step, set_backward_dq
from hylo.kernels.based import based_linear_attention, based_step
from hylo.kernels.conv import short_conv, short_conv_prefill, short_conv_step
from hylo.kernels.lightning import lightning_attention, lightning_step, tnl_slopes
from hylo.kernels.rat import rat_attention, rat_prefill, rat_step

__all__ = [
    "attention", "attention_prefill", "attention_step", "set_backward_dq",
    "based_linear_attention", "based_step",
    "lightning_attention", "lightning_step", "tnl_slopes",
    "rat_attention", "rat_prefill", "rat_step",
    "short_conv", "short_conv_prefill", "short_conv_step",
]
