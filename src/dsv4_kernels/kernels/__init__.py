"""Portable kernel sources, one folder per op family: triton.py and tilelang.py, each one source for
every target. Importing a family module imports its toolchain; the dispatcher does that lazily."""
