"""Layer types by name: `model.pattern` entries are looked up here.  A mixer class registers itself with
`@register_mixer("name")`; the contract it fulfils is models/mixer.py's `Mixer`."""

from __future__ import annotations

from hylo.models.mixer import Mixer

MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str):
    def wrap(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS:
            raise ValueError(f"layer type '{name}' is registered twice ({MIXERS[name].__name__}, {cls.__name__})")
        if not issubclass(cls, Mixer):
            raise TypeError(f"layer type '{name}': {cls.__name__} must subclass models.mixer.Mixer")
        MIXERS[name] = cls
        cls.layer_type = name
        return cls

    return wrap
