"""Measure: what one serving node does (load generator, hardware peaks, roofline accounting, profile, report).

Submodules are imported on demand so that `pernode plan` does not pay for torch or matplotlib.
"""
