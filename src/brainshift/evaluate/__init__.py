"""brainshift.evaluate: metrics of a predicted field against the ground truth, dataset evaluation, reports.

- :mod:`~brainshift.evaluate.metrics`: ``field_errors_mm``, ``tre_mm``, ``jacobian_stats``, ``dice_hd95``
  (plus ``warp_masks``, ``mask_overlap``).
- :mod:`~brainshift.evaluate.run`: ``evaluate_dataset`` (what ``brainshift evaluate`` runs), ``evaluate_case``.
- :mod:`~brainshift.evaluate.tables`: per-case CSV, summary Markdown table, box plots, sweep tables/plots.

Submodules are imported on use (``from brainshift.evaluate.metrics import tre_mm``) so importing the package
stays light.
"""
