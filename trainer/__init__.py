# Recorded first, before anything else loads: the parent a torchrun worker starts with (trainer/launcher_watch.py).
from trainer import launcher_watch as _launcher_watch  # noqa: F401
