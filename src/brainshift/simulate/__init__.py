"""Biomechanical ground-truth simulator: subject synthesis, meshing, materials, loads, FEM solve, rasterise."""
