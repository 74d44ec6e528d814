"""Renamed: saelens_files.py (SAELens-layout run files); file names live in rundir.py. Re-exported until
importers switch."""
from saeforge.trainer.saelens_files import *  # noqa: F401,F403
