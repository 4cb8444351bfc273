"""Patient-space geometry of a case: world coordinates, the liver frame, Couinaud regions, lesion attributes.

Lesion sizes (volume, longest axial diameter) are those of the clinical record (:mod:`custom.clinical.measurements`),
so an expression's "3 cm lesion" is the lesion whose record says about 30 mm.

Every spatial quantity here is computed in RAS world millimetres (``+x`` patient right, ``+y`` anterior,
``+z`` superior) through the affine, never from array indices, so a volume stored in LPS (or any other
axis order) gives exactly the same answers as the same volume stored in RAS.

Liver regions (an approximation of the Couinaud scheme from the liver mask alone, usable on any dataset).
Fractions are taken over the liver's own bounding box in world coordinates:

* ``lateral``  0 at the patient-right edge of the liver, 1 at the tip of the left lobe;
* ``vertical`` 0 at the lowest liver voxel, 1 at the dome;
* ``anterior`` 0 at the most posterior liver voxel, 1 at the most anterior one.

The Cantlie plane ``lateral = 0.55`` separates the right lobe (segments 5-8) from the left lobe (2-4). In the
right lobe the plane ``anterior = 0.5`` separates the anterior sector (5, 8) from the posterior one (6, 7) and
the portal plane ``vertical = 0.5`` the superior segments (7, 8) from the inferior ones (5, 6). In the left
lobe the falciform plane ``lateral = 0.75`` separates segment 4 (medial) from the lateral section, where
``vertical = 0.7`` separates segment 2 (superior) from segment 3 (inferior). The caudate lobe (segment 1) is
not separated. A lesion belongs to the region of its centroid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from monai.transforms.utils import get_largest_connected_component_mask
from scipy import ndimage

from custom.clinical.measurements import axial_axis, axial_diameters, voxel_volume_ml

__all__ = [
    "CANTLIE_FRACTION",
    "FALCIFORM_FRACTION",
    "RIGHT_SECTOR_FRACTION",
    "PORTAL_FRACTION",
    "LEFT_PORTAL_FRACTION",
    "DENSITY_THRESHOLD_HU",
    "LiverFrame",
    "axial_axis",
    "voxel_to_world",
    "world_coordinates",
    "liver_frame",
    "segment_of",
    "classify_density",
    "measure_lesions",
]

CANTLIE_FRACTION = 0.55
FALCIFORM_FRACTION = 0.75
RIGHT_SECTOR_FRACTION = 0.5
PORTAL_FRACTION = 0.5
LEFT_PORTAL_FRACTION = 0.7

#: A lesion is hypodense (hyperdense) when its mean HU is this much below (above) the liver parenchyma median.
DENSITY_THRESHOLD_HU = 15.0


@dataclass(frozen=True)
class LiverFrame:
    """Bounding box of the liver in RAS world millimetres plus the dome point (centre of its top slice)."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    z_range: tuple[float, float]
    dome: tuple[float, float, float]

    @classmethod
    def from_dict(cls, data: dict) -> LiverFrame:
        return cls(
            x_range=tuple(data["x_range"]),
            y_range=tuple(data["y_range"]),
            z_range=tuple(data["z_range"]),
            dome=tuple(data["dome"]),
        )

    def to_dict(self) -> dict:
        return {key: [round(float(v), 2) for v in value] for key, value in asdict(self).items()}

    def fractions(self, point) -> tuple[float, float, float]:
        """(lateral, vertical, anterior) fractions of a RAS point, see the module docstring."""
        x, y, z = (float(v) for v in point)
        lateral = (self.x_range[1] - x) / max(self.x_range[1] - self.x_range[0], 1e-6)
        vertical = (z - self.z_range[0]) / max(self.z_range[1] - self.z_range[0], 1e-6)
        anterior = (y - self.y_range[0]) / max(self.y_range[1] - self.y_range[0], 1e-6)
        return lateral, vertical, anterior

    def plane_offsets(self, point) -> dict[str, float]:
        """Signed distances in mm from a RAS point to the region planes.

        Positive means: patient-right of the Cantlie and falciform planes, anterior to the right sector plane,
        above the portal planes.
        """
        x, y, z = (float(v) for v in point)
        width = self.x_range[1] - self.x_range[0]
        return {
            "cantlie": x - (self.x_range[1] - CANTLIE_FRACTION * width),
            "falciform": x - (self.x_range[1] - FALCIFORM_FRACTION * width),
            "right_sector": y - (self.y_range[0] + RIGHT_SECTOR_FRACTION * (self.y_range[1] - self.y_range[0])),
            "portal": z - (self.z_range[0] + PORTAL_FRACTION * (self.z_range[1] - self.z_range[0])),
            "left_portal": z - (self.z_range[0] + LEFT_PORTAL_FRACTION * (self.z_range[1] - self.z_range[0])),
        }

    def dome_distance(self, point) -> float:
        return float(np.linalg.norm(np.asarray(point, float) - np.asarray(self.dome, float)))


#: Conditions (plane, sign) whose conjunction defines each region; sign +1 means positive offset.
REGION_CONDITIONS: dict[str, tuple[tuple[str, int], ...]] = {
    "right": (("cantlie", 1),),
    "left": (("cantlie", -1),),
    "5": (("cantlie", 1), ("right_sector", 1), ("portal", -1)),
    "6": (("cantlie", 1), ("right_sector", -1), ("portal", -1)),
    "7": (("cantlie", 1), ("right_sector", -1), ("portal", 1)),
    "8": (("cantlie", 1), ("right_sector", 1), ("portal", 1)),
    "4": (("cantlie", -1), ("falciform", 1)),
    "2": (("falciform", -1), ("left_portal", 1)),
    "3": (("falciform", -1), ("left_portal", -1)),
}


def segment_of(offsets: dict[str, float]) -> int:
    """Couinaud segment (2-8) of a point from its plane offsets."""
    for segment in ("2", "3", "4", "5", "6", "7", "8"):
        if all((1 if offsets[plane] >= 0 else -1) == sign for plane, sign in REGION_CONDITIONS[segment]):
            return int(segment)
    raise AssertionError(f"no segment for offsets {offsets}")  # pragma: no cover - regions tile space


def segment_of_fractions(lateral: float, vertical: float, anterior: float) -> int:
    """Couinaud segment (2-8) of a point given as its :meth:`LiverFrame.fractions` (the region planes lie at fixed
    fractions of the liver's extent, so the fractions settle the segment as :meth:`LiverFrame.plane_offsets` does)."""
    return segment_of(
        {
            "cantlie": CANTLIE_FRACTION - lateral,
            "falciform": FALCIFORM_FRACTION - lateral,
            "right_sector": anterior - RIGHT_SECTOR_FRACTION,
            "portal": vertical - PORTAL_FRACTION,
            "left_portal": vertical - LEFT_PORTAL_FRACTION,
        }
    )


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices -> (N, 3) RAS world millimetres."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(ijk, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def world_coordinates(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(H, W, D) boolean mask -> (N, 3) RAS world coordinates of its voxel centres."""
    return voxel_to_world(affine, np.argwhere(mask))


def liver_frame(liver: np.ndarray, affine: np.ndarray) -> LiverFrame | None:
    """Liver frame from the largest connected component of a (H, W, D) liver mask; None for an empty mask."""
    liver = np.asarray(liver) > 0
    liver = get_largest_connected_component_mask(liver, connectivity=1) if liver.any() else liver
    if not liver.any():
        return None
    points = world_coordinates(liver, affine)
    z_top = points[:, 2].max()
    top = points[np.isclose(points[:, 2], z_top, atol=1e-3)]
    return LiverFrame(
        x_range=(float(points[:, 0].min()), float(points[:, 0].max())),
        y_range=(float(points[:, 1].min()), float(points[:, 1].max())),
        z_range=(float(points[:, 2].min()), float(z_top)),
        dome=tuple(float(v) for v in top.mean(axis=0)),
    )


def classify_density(contrast_hu: float) -> str:
    """'hypodense', 'isodense' or 'hyperdense' from the lesion-minus-liver mean HU difference."""
    if contrast_hu <= -DENSITY_THRESHOLD_HU:
        return "hypodense"
    if contrast_hu >= DENSITY_THRESHOLD_HU:
        return "hyperdense"
    return "isodense"


def measure_lesions(
    lesions: np.ndarray,
    affine: np.ndarray,
    image: np.ndarray | None = None,
    liver: np.ndarray | None = None,
    kinds: dict[int, str] | None = None,
) -> tuple[list[dict], dict]:
    """Measure every lesion of a (H, W, D) instance map in RAS world coordinates.

    Args:
        lesions: instance map, 0 background, 1..K one id per lesion.
        affine: 4x4 voxel-to-RAS affine of the arrays.
        image: CT in HU, same shape; gives ``mean_hu``, ``contrast_hu`` and ``density``.
        liver: liver mask (lesions included), same shape; gives the liver frame, ``lobe``, ``segment``.
        kinds: lesion type per id when known (synthetic data); otherwise the type is left to the caller.

    Returns:
        (per-lesion attribute dicts sorted by id, case-level dict with ``liver_frame`` and ``liver_hu``).
    """
    lesions = np.asarray(lesions)
    affine = np.asarray(affine, float)
    voxel_ml = voxel_volume_ml(affine)
    frame = liver_frame(liver, affine) if liver is not None else None
    liver_hu = None
    if image is not None and liver is not None and (parenchyma := (np.asarray(liver) > 0) & (lesions == 0)).any():
        liver_hu = float(np.median(np.asarray(image)[parenchyma]))
    attributes = []
    for index, box in enumerate(ndimage.find_objects(lesions.astype(np.int32)), start=1):
        if box is None:
            continue
        mask = lesions[box] == index
        offset = np.array([s.start for s in box])
        sub_affine = affine.copy()
        sub_affine[:3, 3] = voxel_to_world(affine, offset[None])[0]
        points = world_coordinates(mask, sub_affine)
        centroid = points.mean(axis=0)
        item = {
            "id": index,
            "kind": (kinds or {}).get(index),
            "centroid_ras_mm": [round(float(v), 1) for v in centroid],
            "z_range_mm": [round(float(points[:, 2].min()), 1), round(float(points[:, 2].max()), 1)],
            "volume_ml": round(float(mask.sum() * voxel_ml), 3),
            "longest_axial_diameter_mm": round(
                axial_diameters(mask, sub_affine, perpendicular=False)["longest_axial_diameter_mm"], 1
            ),
        }
        if image is not None:
            mean_hu = float(np.asarray(image)[box][mask].mean())
            item["mean_hu"] = round(mean_hu, 1)
            if liver_hu is not None:
                item["contrast_hu"] = round(mean_hu - liver_hu, 1)
                item["density"] = classify_density(item["contrast_hu"])
        if frame is not None:
            offsets = frame.plane_offsets(centroid)
            item["lobe"] = "right" if offsets["cantlie"] >= 0 else "left"
            item["segment"] = segment_of(offsets)
            item["dome_distance_mm"] = round(frame.dome_distance(centroid), 1)
        attributes.append(item)
    case = {
        "liver_frame": frame.to_dict() if frame is not None else None,
        "liver_hu": round(liver_hu, 1) if liver_hu is not None else None,
    }
    return attributes, case
