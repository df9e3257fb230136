"""Model code: a decoder-only LM whose blocks mix sequence-mixing layer types by `model.pattern`.

Nothing here knows about parallelism; `parallel/` wraps a built model from outside.
"""

from models.lm import HybridLM, layer_types
from models.registry import MIXERS, register_mixer

__all__ = ["HybridLM", "MIXERS", "layer_types", "register_mixer"]
