"""MERIT conflict profiling: calibration, gradient sketches, conflict PCA and the split plan.

`run_profile_stage` is what the `profile` stage runs; `sketch_sources` and the sketch-set
save/load/combine functions let a site profile its own sources and ship only the sketch.
"""

from .sketch import CountSketch
from .sketchset import (
    SketchSet,
    combine_sketch_sets,
    load_sketch_set,
    profile_sketches,
    save_sketch_set,
    sketch_sources,
)
from .stage import profile_to_dir, run_profile_stage

__all__ = [
    "CountSketch", "SketchSet", "combine_sketch_sets", "load_sketch_set", "profile_sketches",
    "profile_to_dir", "run_profile_stage", "save_sketch_set", "sketch_sources",
]
