"""Renamed: trainer/grid.py (sweep-grid expansion). Re-export until importers switch."""
from saeforge.trainer.grid import *  # noqa: F401,F403
