"""File I/O for images, keypoints and displacement fields.

All RAS <-> LPS and ITK matrix conversions live in :mod:`brainshift.io.frames` and nowhere else.
"""
