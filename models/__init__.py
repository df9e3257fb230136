"""Model code: a decoder-only LM whose blocks mix sequence-mixing layer types by `model.pattern`.

Nothing here knows about parallelism; `parallel/` wraps a built model from outside.  Importing the package
registers the layer types (each mixer module registers itself).
"""

from models import attention, based, rat, tnl  # noqa: F401  (fills the registry)
from models.lm import HybridLM, layer_types
from models.mixer import Mixer
from models.registry import MIXERS, register_mixer

__all__ = ["HybridLM", "MIXERS", "Mixer", "layer_types", "register_mixer"]
