"""Sub-commands that live beside serving and the online learner (registered into the CLI)."""
from __future__ import annotations


def register(sub) -> None:
    """Add serve / learn / bench / demo sub-commands where their modules exist."""
    for module in ("serving.cli", "online.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)
    from feedrank import demo
    demo.register(sub)
