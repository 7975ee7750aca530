"""The bottom layer: the error hierarchy, atomic writes, threads and value checks. Imports nothing
else of fedshield."""
