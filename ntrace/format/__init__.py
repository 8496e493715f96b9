"""Reading, writing, validating and packing traces as ``spec/`` defines them.

Imports zarr and numpy, never torch: a trace written by another tool reads the same, and
reading one needs no deep-learning stack. Import the modules themselves (``reader``,
``writer``, ``validate``, ``pack``, ``summary``); this package imports nothing.
"""
