"""Scope before lesions: is the organ the network calls liver plausibly a liver in view?

The text-free liver output answers on any image; on a head CT it marks the brain, on the chest the heart, below the
liver a kidney. Before any lesion is answered, :func:`liver_scope` checks the liver the network found against the
anatomy around it, on the RAS grid of the pipeline, at the axial slice where the found liver is largest:

- the body is an abdomen: at least :data:`MIN_BODY_WIDTH_MM` from side to side (a head is about 14-18 cm), unless
  the body is cut by the image's edge (a field of view narrower than the body);
- the liver lies in the right half of the body: its centre to the patient's right of the body's midline by at least
  :data:`MIN_RIGHT_OFFSET` of the half-width, and reaching the right body wall (its right edge beyond
  :data:`MIN_RIGHT_REACH` of the half-width);
- enough of it is in view: at least :data:`MIN_SLICE_AREA_CM2` at its largest slice (a liver's largest axial slice
  is 100-250 cm2 in adults; a sliver at the first or last slice is another organ, or a scan that ends above or
  below the liver).

Out of scope means "not present" for every expression, with the reason in the record. The thresholds sit far from
the values of the phantom's livers and of the real livers at hand (bundle docs, Scope), and are checked by
``python -m benchmarks.scope``. What the rules do not see: a liver moved by disease or surgery (a left-sided liver,
situs inversus) is refused; an organ that imitates a liver in the right upper abdomen (a large right kidney in a scan
that ends below the liver) can pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from custom.clinical.geometry import largest_component

__all__ = ["BODY_HU", "liver_scope"]

#: Voxels above this (HU) are body (soft tissue, fat at -100 HU, bone); air and lung are below.
BODY_HU = -400.0
#: An abdomen is wider than this from side to side (mm); a head or a limb is narrower.
MIN_BODY_WIDTH_MM = 220.0
#: The liver's centre lies this share of the body's half-width to the patient's right of its midline, at least.
MIN_RIGHT_OFFSET = 0.08
#: ... and its right edge reaches this share of the half-width towards the right body wall.
MIN_RIGHT_REACH = 0.5
#: The liver's largest axial slice covers this many cm2 at least.
MIN_SLICE_AREA_CM2 = 40.0


def body_slice(hounsfield: np.ndarray) -> np.ndarray | None:
    """(X, Y) HU of one axial slice -> the body (its largest component above :data:`BODY_HU`, holes such as the
    lungs and bowel gas filled), or None when the slice holds none."""
    body = largest_component(hounsfield > BODY_HU)
    return None if body is None else ndimage.binary_fill_holes(body)


def liver_scope(liver: np.ndarray, hounsfield: np.ndarray, spacing: Sequence[float]) -> dict:
    """Whether ``liver`` is plausibly a liver in view (see the module docstring).

    Args:
        liver: (X, Y, Z) bool, the liver found (its largest component), on a RAS grid (a higher first index is
            further to the patient's right).
        hounsfield: (X, Y, Z) HU on the same grid.
        spacing: voxel sizes in mm along X, Y, Z.

    Returns:
        JSON-ready ``{"in_scope": bool, "reason": str (when out of scope), "measurements": {...}}``.
    """
    spacing = [float(s) for s in spacing]
    areas = liver.sum(axis=(0, 1))
    z = int(np.argmax(areas))
    section, body = liver[:, :, z], body_slice(np.asarray(hounsfield[:, :, z], dtype=np.float32))
    area_cm2 = float(areas[z]) * spacing[0] * spacing[1] / 100.0
    measured: dict = {"slice": z, "liver_area_cm2": round(area_cm2, 1)}
    if body is None or not (body & section).any():
        return {"in_scope": False, "reason": "no body around the organ found as liver", "measurements": measured}
    columns = np.flatnonzero(body.any(axis=1))
    midline, half_width = (columns[0] + columns[-1]) / 2.0, max((columns[-1] - columns[0]) / 2.0, 1.0)
    liver_columns = np.flatnonzero(section.any(axis=1))
    cut = bool(body[0].any() or body[-1].any() or body[:, 0].any() or body[:, -1].any())
    measured.update(
        body_width_mm=round(float(columns[-1] - columns[0] + 1) * spacing[0], 1),
        body_cut_by_image_edge=cut,
        right_offset=round(float(np.mean(np.nonzero(section)[0]) - midline) / half_width, 3),
        right_reach=round(float(liver_columns[-1] - midline) / half_width, 3),
    )
    reason = None
    if not cut and measured["body_width_mm"] < MIN_BODY_WIDTH_MM:
        reason = (
            f"no liver in view: the body is {measured['body_width_mm']:.0f} mm wide where the organ found is largest, "
            "as a head or a limb, not an abdomen"
        )
    elif measured["right_offset"] < MIN_RIGHT_OFFSET or measured["right_reach"] < MIN_RIGHT_REACH:
        reason = (
            "no liver in view: the organ found lies at or left of the body's midline, not in the right upper abdomen "
            "(a heart, a brain or another organ)"
        )
    elif area_cm2 < MIN_SLICE_AREA_CM2:
        edge = "ends above or below the liver" if areas[0] or areas[-1] else "shows no liver"
        reason = f"no liver in view: the organ found covers {area_cm2:.0f} cm2 at most per slice; the scan {edge}"
    return {"in_scope": reason is None, **({"reason": reason} if reason else {}), "measurements": measured}
