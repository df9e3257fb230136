"""Layer types by name: `model.pattern` entries are looked up here.

A mixer module registers itself with `@register_mixer("name")`.  Besides `forward(x, positions)` (x is the
pre-normed (batch, seq, d_model) input, positions the tokens' global positions) and `step(x, pos, cache)` for
recurrent decoding (x is (batch, 1, d_model) at global position `pos`; `cache=None` starts), it answers two
questions the rest of the framework asks without building it: `check_config(config)` (does this run's
layout suit the layer? returns the reason if not, else None) and `attention_flops_per_token(model_cfg,
seq_len)` (forward FLOPs a token spends in the sequence mixing itself, beyond the projections that 6N already
counts; so linear layers are not counted as quadratic).
"""

from __future__ import annotations

from typing import Any

MIXERS: dict[str, Any] = {}


def register_mixer(name: str):
    def wrap(cls):
        if name in MIXERS:
            raise ValueError(f"layer type '{name}' is registered twice ({MIXERS[name].__name__}, {cls.__name__})")
        MIXERS[name] = cls
        cls.layer_type = name
        return cls

    return wrap


# Importing the mixer modules fills the registry.
from models import attention, based, rat, tnl  # noqa: E402,F401
