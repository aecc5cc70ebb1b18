"""Quick-look figure of a simulated case: the preop image with the displacement magnitude overlaid."""

from __future__ import annotations

from pathlib import Path


def save_displacement_png(image, field_vox, path: Path, *, cavity=None, brain=None, title: str | None = None) -> Path:
    """Three orthogonal slices of ``image`` through the largest displacement, magnitude (mm) overlaid.

    Args:
        image: the preop :class:`~brainshift.volume.Volume`.
        field_vox: ``(3, I, J, K)`` displacement on its grid. Convention: forward Lagrangian, voxel units.
        path: PNG to write (atomically; matplotlib Agg).
        cavity: optional resection cavity (label Volume), outlined in cyan and left out of the maximum.
        brain: optional brain mask (label Volume) to restrict the search for the maximum.
        title: figure title (max and median magnitude are appended).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from brainshift.field import displacement_magnitude_mm
    from brainshift.io.atomic import atomic_output

    mag = displacement_magnitude_mm(field_vox, image.affine)
    region = (mag > 0) if brain is None else (np.asarray(brain.data) > 0)
    cav = np.zeros(mag.shape, dtype=bool) if cavity is None else np.asarray(cavity.data) > 0
    search = np.where(region & ~cav, mag, -1.0)
    peak = np.unravel_index(int(np.argmax(search)), mag.shape)
    vals = mag[region & ~cav] if (region & ~cav).any() else np.zeros(1)
    vmax = max(float(vals.max()), 1e-6)
    img = np.asarray(image.data, dtype=np.float32)
    sp = image.spacing
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    views = [(f"i = {peak[0]} (sagittal for RAS-aligned images)", np.s_[peak[0], :, :], (sp[1], sp[2])),
             (f"j = {peak[1]} (coronal)", np.s_[:, peak[1], :], (sp[0], sp[2])),
             (f"k = {peak[2]} (axial)", np.s_[:, :, peak[2]], (sp[0], sp[1]))]
    im = None
    for ax, (name, sl, (sx, sy)) in zip(axes, views, strict=True):
        aspect = sy / sx
        ax.imshow(img[sl].T, origin="lower", cmap="gray", aspect=aspect)
        overlay = np.ma.masked_where(~region[sl], mag[sl])  # the whole brain overlaid, 0 mm included
        im = ax.imshow(overlay.T, origin="lower", cmap="inferno", alpha=0.6, vmin=0, vmax=vmax, aspect=aspect)
        if cav[sl].any():
            ax.contour(cav[sl].T.astype(float), [0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="displacement magnitude (mm)")
    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}max {vmax:.2f} mm, median {float(np.median(vals)):.2f} mm (cavity outlined)")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)
