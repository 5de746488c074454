"""Accelerations of merge methods (see `mcomp.merge.acceleration`), one module per method."""
