"""What scanners do to a CT, as functions and as a random training transform.

The functions move a CT's Hounsfield units the way another contrast phase would, inside the liver label: the
robustness benchmark (``benchmarks/robustness.py``) applies them with fixed settings to perturb the test split, and
:class:`RandContrastPhased` draws them at random during training, so that the network reads the liver against its
surroundings rather than the generator's exact HU. HU offsets, noise and reconstruction kernels are MONAI's own
random transforms in the training config (``RandShiftIntensityd``, ``RandGaussianNoised``, ``RandGaussianSmoothd``,
``RandGaussianSharpend``); only the phase needs the liver and lesion labels, hence this transform.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

__all__ = ["BODY_HU", "body_mask", "change_phase", "liver_parts", "RandContrastPhased"]

#: Voxels above this HU are the body (air and lung below it).
BODY_HU = -500.0
#: A liver voxel is a vessel when its smoothed HU exceeds the parenchyma's median by this much.
VESSEL_MARGIN_HU = 20.0
#: Vessels are looked for this many voxels away from any lesion.
LESION_CLEARANCE_VOXELS = 2


def body_mask(image: np.ndarray) -> np.ndarray:
    """Voxels of the body: HU above :data:`BODY_HU` (air and lung excluded)."""
    return image > BODY_HU


def liver_parts(image: np.ndarray, liver: np.ndarray, lesions: np.ndarray, sigma: Sequence[float]) -> dict:
    """The liver's parenchyma HU (median away from lesions), its vessel mask and the vessels' mean HU.

    ``image``, ``liver`` and ``lesions`` are arrays of one shape (2D or 3D). Vessels: liver voxels at least
    :data:`LESION_CLEARANCE_VOXELS` from any lesion whose HU, smoothed by a Gaussian of per-axis ``sigma`` voxels,
    exceeds the parenchyma by :data:`VESSEL_MARGIN_HU`.
    """
    inside = liver > 0
    away = inside & ~ndimage.binary_dilation(lesions > 0, iterations=LESION_CLEARANCE_VOXELS)
    if not away.any():
        return {"liver_hu": None, "vessels": np.zeros_like(inside), "vessel_hu": None}
    liver_hu = float(np.median(image[away]))
    smooth = ndimage.gaussian_filter(image.astype(np.float32), tuple(sigma), mode="nearest")
    vessels = away & (smooth > liver_hu + VESSEL_MARGIN_HU)
    vessel_hu = float(image[vessels].mean()) if vessels.any() else None
    return {"liver_hu": liver_hu, "vessels": vessels, "vessel_hu": vessel_hu}


def change_phase(
    image: np.ndarray,
    liver: np.ndarray,
    lesions: np.ndarray,
    liver_hu: float,
    vessel_hu: float,
    sigma: Sequence[float],
) -> tuple[np.ndarray, dict]:
    """Another contrast phase inside the liver label: parenchyma to ``liver_hu``, vessels to ``vessel_hu``.

    Every liver voxel (lesions included: their contrast to the liver is kept, which the density words need) is moved
    by the parenchyma's offset; the vessels (:func:`liver_parts`, smoothing ``sigma``) then by what brings their
    mean to ``vessel_hu``. Returns the float32 image and what was measured and changed.
    """
    parts = liver_parts(image, liver, lesions, sigma)
    out = image.astype(np.float32)
    if parts["liver_hu"] is None:
        return out, {"liver_hu": None}
    shift = liver_hu - parts["liver_hu"]
    out[liver > 0] += shift
    if parts["vessel_hu"] is not None:
        out[parts["vessels"]] += vessel_hu - parts["vessel_hu"] - shift
    info = {
        "liver_hu": round(parts["liver_hu"], 1),
        "liver_shift_hu": round(shift, 1),
        "vessel_hu": None if parts["vessel_hu"] is None else round(parts["vessel_hu"], 1),
        "vessel_voxels": int(parts["vessels"].sum()),
    }
    return out, info


class RandContrastPhased(RandomizableTransform, MapTransform):
    """Random contrast phase of an axial slice in HU, from its dense training target.

    ``image`` (C, H, W) HU; ``label_key`` (K, H, W) the dense targets of :class:`custom.transforms.ReferredMaskd`
    (channel ``liver_channel`` the liver, ``lesion_channel`` all lesions). With probability ``prob`` the liver's
    parenchyma is moved to a HU drawn from ``liver_hu_range`` and its vessels to that plus a HU drawn from
    ``vessel_offset_range`` (unenhanced: vessels darker than the liver; arterial, portal and delayed: brighter), each
    lesion keeping its contrast to the liver. Slices without liver are returned unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str = "label",
        liver_channel: int = 1,
        lesion_channel: int = 2,
        liver_hu_range: Sequence[float] = (45.0, 135.0),
        vessel_offset_range: Sequence[float] = (-25.0, 90.0),
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if liver_hu_range[0] > liver_hu_range[1] or vessel_offset_range[0] > vessel_offset_range[1]:
            raise ValueError("liver_hu_range and vessel_offset_range must be (low, high) with low <= high.")
        self.label_key = label_key
        self.liver_channel = int(liver_channel)
        self.lesion_channel = int(lesion_channel)
        self.liver_hu_range = tuple(float(v) for v in liver_hu_range)
        self.vessel_offset_range = tuple(float(v) for v in vessel_offset_range)
        self._liver_hu = 0.0
        self._vessel_offset = 0.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._liver_hu = float(self.R.uniform(*self.liver_hu_range))
        self._vessel_offset = float(self.R.uniform(*self.vessel_offset_range))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        label = d.get(self.label_key)
        if not self._do_transform or label is None or label.shape[0] <= max(self.liver_channel, self.lesion_channel):
            return d
        label = np.asarray(torch.as_tensor(label).detach().cpu())
        liver, lesions = label[self.liver_channel] > 0, label[self.lesion_channel] > 0
        if not liver.any():
            return d
        sigma = (1.0,) * liver.ndim
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            channels = [
                change_phase(channel, liver, lesions, self._liver_hu, self._liver_hu + self._vessel_offset, sigma)[0]
                for channel in image.detach().cpu().numpy()
            ]
            moved = torch.as_tensor(np.stack(channels), dtype=image.dtype)
            d[key] = image.clone()
            d[key][...] = moved
        return d
