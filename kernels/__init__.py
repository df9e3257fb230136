"""Sequence-mixing ops, one folder each (the fla pattern): `naive.py` oracle, `chunk.py` PyTorch path, `step.py`
recurrent decoding.  Tensors are (batch, seq, heads, head_dim); `backend=` picks a path."""

from kernels.attention import attention, attention_prefill, attention_step, set_backward_dq
from kernels.based import based_linear_attention, based_step
from kernels.conv import short_conv, short_conv_prefill, short_conv_step
from kernels.lightning import lightning_attention, lightning_step, tnl_slopes
from kernels.rat import rat_attention, rat_prefill, rat_step

__all__ = [
    "attention", "attention_prefill", "attention_step", "set_backward_dq",
    "based_linear_attention", "based_step",
    "lightning_attention", "lightning_step", "tnl_slopes",
    "rat_attention", "rat_prefill", "rat_step",
    "short_conv", "short_conv_prefill", "short_conv_step",
]
