"""Measure what each model variant costs per batch size: the input of the planner.

``profile_variants`` runs the real pipelines; ``measure_ladder`` is the loop itself (injectable
runner, probe and clock); ``import_csvs`` reads the DiffServe artifact's published runtimes.
"""

from diffserve.formats.runtime_csv import import_csvs, read_runtime_csv
from diffserve.profiler.measure import Limits, measure_batch, measure_ladder
from diffserve.profiler.memory import MemoryProbe
from diffserve.profiler.run import DEFAULT_BATCH_SIZES, ProfileSettings, profile_variants

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "Limits",
    "MemoryProbe",
    "ProfileSettings",
    "import_csvs",
    "measure_batch",
    "measure_ladder",
    "profile_variants",
    "read_runtime_csv",
]
