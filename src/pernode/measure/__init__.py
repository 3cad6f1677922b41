"""Measure: what one serving node does (load generator, hardware peaks, roofline accounting, profile, report).

The package imports none of its submodules. What the planner reads of it (profile/profile_schema.py, roofline.py,
accelerators.py, projection.py) imports neither torch nor matplotlib; the measuring itself needs torch and the engine.
"""
