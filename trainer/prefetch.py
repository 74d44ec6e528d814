"""Moved to ``saeforge.stores.background`` (the trainer and harvest share it); re-exported until callers switch."""
from saeforge.stores.background import Prefetcher  # noqa: F401
