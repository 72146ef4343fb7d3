"""Benchmarks of ditcache (run from the repository root, e.g. ``python -m bench.quality --smoke``).

A regular package, so ``import bench`` finds this folder even where another ``bench`` folder (the
tests') is also on the path.
"""
