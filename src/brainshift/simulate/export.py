"""Export of a simulated case's mesh for ParaView / 3D Slicer (``.vtu`` via meshio)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainshift.simulate.mesh import TISSUES


def export_vtu(result, path: str | Path) -> Path:
    """Write the final mesh of a :class:`~brainshift.simulate.case.SimulationResult` as VTK unstructured grid.

    Points are the preop node positions in RAS mm; point data ``displacement_mm`` (RAS mm, forward: the node
    moves to ``point + displacement``); cell data ``<tissue>_fraction`` and ``brain_fraction``. A voxel grid
    with a reflection (negative affine determinant) gets its hexahedra reordered so VTK sees them positively
    oriented. Written atomically.

    Args:
        result: the simulation result (``mesh`` and ``nodal_displacement_mm``).
        path: output ``.vtu`` path.

    Returns:
        The path written.
    """
    import meshio

    from brainshift.io.atomic import atomic_output

    mesh = result.mesh
    cells = mesh.elements
    if np.linalg.det(mesh.image_affine[:3, :3]) < 0:
        cells = cells[:, [0, 3, 2, 1, 4, 7, 6, 5]]
    cell_data = {f"{t}_fraction": [mesh.fractions[:, i].astype(np.float32)] for i, t in enumerate(TISSUES)}
    cell_data["brain_fraction"] = [mesh.brain_fraction.astype(np.float32)]
    m = meshio.Mesh(points=mesh.nodes_ras, cells=[("hexahedron", cells)],
                    point_data={"displacement_mm": np.asarray(result.nodal_displacement_mm, dtype=np.float64)},
                    cell_data=cell_data)
    target = Path(path)
    with atomic_output(target) as tmp:
        meshio.write(str(tmp), m, file_format="vtu")
    return target
