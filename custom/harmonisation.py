"""What scanners do to a CT, undone before the network reads it.

The shipped weights learned the generator's CT (``custom.data.phantom``): fat near -95 HU, noise of 8-16 HU, slices
3-5 mm. A scan outside that is brought towards it on the network's grid, each correction only where the scan is
measured to be outside, and each written into the record as ``input_harmonisation``:

- thin slices (:class:`ThickenSlicesd`): slices closer than ``min_slice_mm`` are averaged into slabs of
  ``slice_mm`` (a Gaussian slab profile, then resampled), as a thicker reconstruction would; the answer returns to
  the input's own slices through MONAI's inverse of the resampling;
- an HU offset (:class:`HarmoniseHUd`): subcutaneous and visceral fat, the body's own reference, is found as the
  peak of the body's histogram between -220 and -20 HU; a peak more than ``offset_tolerance_hu`` from
  ``fat_reference_hu`` is moved onto it, the whole image with it;
- noise: the robust standard deviation inside the fat (away from its edges) above ``noise_limit_hu`` is brought
  down to ``noise_target_hu`` by the least in-plane Gaussian smoothing that does it.

The record's measurements stay those of the image as given; only the network and the candidates' HU features read
the corrected image. :mod:`custom.augmentation` does the opposite: it draws the same changes at random in training.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacingd, Transform
from monai.utils import TraceKeys
from scipy import ndimage

from custom.augmentation import BODY_HU

__all__ = [
    "FAT_SEARCH_HU",
    "fat_peak_hu",
    "fat_noise_hu",
    "HarmoniseHUd",
    "LiverPhaseInfod",
    "LiverPhaseNormaliser",
    "ThickenSlicesd",
]

#: The HU range searched for the fat peak: wide enough for offsets of +-75 HU around calibrated fat.
FAT_SEARCH_HU = (-220.0, -20.0)
#: A fat peak is trusted when at least this share of the body lies within 30 HU of it.
MIN_FAT_SHARE = 0.05
#: In-plane Gaussian sigmas (voxels of the network grid) tried, weakest first, to bring the noise down.
SMOOTHING_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def fat_peak_hu(image: np.ndarray) -> tuple[float | None, float]:
    """The fat peak of a CT (any shape, HU): the mode of the body's histogram (2 HU bins, smoothed) within
    :data:`FAT_SEARCH_HU`, and the share of body voxels within 30 HU of it; ``None`` when that share is under
    :data:`MIN_FAT_SHARE` (too little fat to be a reference) or the histogram does not fall on both sides of it
    (the mode sits on a flank at the range's edge)."""
    values = image[image > BODY_HU]
    if values.size == 0:
        return None, 0.0
    edges = np.arange(FAT_SEARCH_HU[0] - 80.0, FAT_SEARCH_HU[1] + 82.0, 2.0)
    counts, _ = np.histogram(values, bins=edges)
    smoothed = ndimage.gaussian_filter1d(counts.astype(np.float64), 2.5)
    centres = 0.5 * (edges[:-1] + edges[1:])
    inside = (centres >= FAT_SEARCH_HU[0]) & (centres <= FAT_SEARCH_HU[1])
    index = int(np.argmax(np.where(inside, smoothed, -1.0)))
    peak = float(centres[index])
    share = float(np.mean(np.abs(values - peak) < 30.0))
    # a rising or falling flank at the search range's edge is no peak (soft tissue's tail, or air's)
    is_peak = smoothed[index] > smoothed[index - 3] and smoothed[index] > smoothed[index + 3]
    return (peak if share >= MIN_FAT_SHARE and is_peak else None), share


def fat_mask(image: np.ndarray, fat_hu: float) -> np.ndarray:
    """Voxels of ``image`` (X, Y, Z) within 80 HU of the fat peak, two voxels in plane away from anything else."""
    fat = (image > BODY_HU) & (np.abs(image - fat_hu) < 80.0)
    return ndimage.binary_erosion(fat, np.ones((5, 5, 1), bool))


def robust_std(values: np.ndarray) -> float:
    """1.4826 times the median absolute deviation: the standard deviation of Gaussian values, robust to outliers."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def fat_noise_hu(image: np.ndarray, mask: np.ndarray) -> float | None:
    """The noise of ``image`` (X, Y, Z, HU) as the robust standard deviation inside the fat ``mask``; ``None`` with
    fewer than 1000 fat voxels."""
    values = image[mask]
    return robust_std(values) if values.size >= 1000 else None


class HarmoniseHUd(MapTransform):
    """Correct an HU offset and strong noise of a CT on the network's grid (see the module docstring).

    ``d[key]``: (1, X, Y, Z) HU, the last axis across slices. Writes what was measured and done into
    ``d[info_key]`` (merged with what is there): ``fat_hu``, ``hu_shift`` (added to the image, 0 when none),
    ``noise_hu``, ``smoothing_sigma_mm`` and ``noise_after_hu`` (when smoothed), and ``notes`` for the record.

    Args:
        fat_reference_hu: where fat lies in the CT the network learned.
        offset_tolerance_hu: fat peaks within this many HU of the reference are left as they are.
        noise_limit_hu: noise up to this is left as it is.
        noise_target_hu: stronger noise is smoothed down to this.
    """

    def __init__(
        self,
        keys: KeysCollection,
        fat_reference_hu: float = -95.0,
        offset_tolerance_hu: float = 30.0,
        noise_limit_hu: float = 25.0,
        noise_target_hu: float = 18.0,
        info_key: str = "input_harmonisation",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if noise_target_hu > noise_limit_hu:
            raise ValueError(f"noise_target_hu ({noise_target_hu}) must not exceed noise_limit_hu ({noise_limit_hu}).")
        self.fat_reference_hu = float(fat_reference_hu)
        self.offset_tolerance_hu = float(offset_tolerance_hu)
        self.noise_limit_hu = float(noise_limit_hu)
        self.noise_target_hu = float(noise_target_hu)
        self.info_key = info_key

    def harmonise(self, image: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, dict]:
        """``image`` (X, Y, Z) HU corrected, and what was done; ``spacing_mm`` the in-plane voxel size."""
        info: dict = {"hu_shift": 0.0, "notes": []}
        fat_hu, _ = fat_peak_hu(image)
        if fat_hu is None:
            return image, info
        info["fat_hu"] = fat_hu
        offset = fat_hu - self.fat_reference_hu
        if abs(offset) > self.offset_tolerance_hu:
            image = image - np.float32(offset)
            fat_hu = self.fat_reference_hu
            info["hu_shift"] = -offset
            info["notes"].append(
                f"The body's fat measures {info['fat_hu']:.0f} HU where calibrated CT has about "
                f"{self.fat_reference_hu:.0f} HU: the network read the image {-offset:+.0f} HU from its stored values "
                "(the measurements in this record are the stored values)."
            )
        mask = fat_mask(image, fat_hu)
        noise = fat_noise_hu(image, mask)
        if noise is None:
            return image, info
        info["noise_hu"] = round(noise, 2)
        if noise <= self.noise_limit_hu:
            return image, info
        for sigma in SMOOTHING_SIGMAS:
            smoothed = ndimage.gaussian_filter(image, (sigma, sigma, 0.0), mode="nearest")
            after = fat_noise_hu(smoothed, mask)
            if after is None or after <= self.noise_target_hu:
                break
        info.update(smoothing_sigma_mm=round(sigma * spacing_mm, 3), noise_after_hu=round(after or 0.0, 2))
        info["notes"].append(
            f"The image is noisy ({noise:.0f} HU in fat): the network read it smoothed in plane (Gaussian sigma "
            f"{sigma * spacing_mm:.1f} mm)."
        )
        return smoothed, info

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = d[key]
            values = volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)
            spacing = float(volume.pixdim[0]) if isinstance(volume, MetaTensor) else 1.0
            image, info = self.harmonise(values[0].float().cpu().numpy(), spacing)
            corrected = torch.as_tensor(image, dtype=torch.float32)[None]
            d[key] = (
                MetaTensor(corrected, meta=volume.meta, applied_operations=volume.applied_operations)
                if (isinstance(volume, MetaTensor))
                else corrected
            )
            merged = dict(d.get(self.info_key) or {})
            info["notes"] = list(merged.get("notes") or []) + info["notes"]
            d[self.info_key] = {**merged, **info}
        return d


class ThickenSlicesd(Spacingd):
    """MONAI ``Spacingd`` along the slice axis only, for slices thinner than the network learned.

    ``d[key]``: (C, X, Y, Z), the last axis across slices. Slices closer than ``min_slice_mm`` are smoothed along
    that axis by a Gaussian slab profile (FWHM ``sqrt(slice_mm**2 - spacing**2)``) and resampled every
    ``slice_mm`` mm (the end slices continuing as themselves); other volumes, and those too short for two slabs,
    pass unchanged. The resampling is recorded like any ``Spacingd``, so MONAI's
    inverse returns an answer to the input's slices. Writes ``slice_mm: [given, read]`` and a note into
    ``d[info_key]`` when it resamples.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_slice_mm: float = 2.5,
        slice_mm: float = 3.0,
        info_key: str = "input_harmonisation",
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        if slice_mm < min_slice_mm:
            raise ValueError(f"slice_mm ({slice_mm}) must be at least min_slice_mm ({min_slice_mm}).")
        super().__init__(
            keys,
            pixdim=(-1.0, -1.0, float(slice_mm)),
            mode=mode,
            dtype=torch.float32,
            allow_missing_keys=allow_missing_keys,
        )
        self.min_slice_mm = float(min_slice_mm)
        self.slice_mm = float(slice_mm)
        self.info_key = info_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict:
        d = dict(data)
        keys = [key for key in self.key_iterator(d) if isinstance(d[key], MetaTensor)]
        spacing = float(d[keys[0]].pixdim[2]) if keys else None
        slices = int(d[keys[0]].shape[-1]) if keys else 0
        if spacing is None or spacing >= self.min_slice_mm - 1e-6 or slices * spacing < 2 * self.slice_mm:
            return d  # nothing recorded (thick slices, or too few for two slabs): the inverse leaves it as it is
        sigma = np.sqrt(self.slice_mm**2 - spacing**2) / FWHM_PER_SIGMA / spacing
        for key in keys:  # the end slices continue as themselves (zero padding would darken them)
            slabs = ndimage.gaussian_filter1d(d[key].as_tensor().float().cpu().numpy(), sigma, axis=-1, mode="nearest")
            d[key] = MetaTensor(torch.as_tensor(slabs), meta=d[key].meta, applied_operations=d[key].applied_operations)
        d = super().__call__(d, lazy=lazy)
        info = dict(d.get(self.info_key) or {})
        info["slice_mm"] = [round(spacing, 3), self.slice_mm]
        info["notes"] = list(info.get("notes") or []) + [
            f"Slices {spacing:.2g} mm apart: the network read them averaged into {self.slice_mm:g} mm slabs, the "
            "thickness it learned; the answer is returned on the image's own slices."
        ]
        d[self.info_key] = info
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        """MONAI's inverse of the resampling, for the volumes this transform resampled (the last operation recorded
        on them is its own); the others are returned as they are."""
        d = dict(data)
        for key in self.key_iterator(d):
            operations = getattr(d[key], "applied_operations", None)
            if operations and operations[-1].get(TraceKeys.ID) == id(self.spacing_transform.sp_resample):
                d[key] = self.spacing_transform.inverse(d[key])
        return d


class LiverPhaseNormaliser:
    """Move a liver whose parenchyma is outside the HU the network learned back into it, on windowed inputs.

    The generator's livers lie between 70 and 125 HU (arterial to portal venous); an unenhanced or fatty liver
    (35-65 HU) is read by the network as another tissue. Given the liver of a first pass, the liver's median HU is
    measured on the widest window; outside ``hu_range``, every voxel of the liver grown by one voxel in plane
    (its lesions with it, so their contrast to the liver, which the density words read, is kept) is moved by
    ``target_hu`` minus that median, and each window is recomputed.

    ``inputs``: (1, C, X, Y, Z), channel ``w`` the image through ``windows[w]`` (``custom.transforms.HUWindowd``);
    ``liver``: (X, Y, Z) bool.
    """

    def __init__(
        self,
        windows: list,
        hu_range: tuple[float, float] = (65.0, 130.0),
        target_hu: float = 80.0,
        min_voxels: int = 500,
    ) -> None:
        self.windows = [(float(c) - float(w) / 2.0, float(w)) for c, w in windows]
        self.hu_range = (float(hu_range[0]), float(hu_range[1]))
        self.target_hu = float(target_hu)
        self.min_voxels = int(min_voxels)
        self.widest = int(np.argmax([w for _, w in self.windows]))

    def __call__(self, inputs: torch.Tensor, liver: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """The inputs with the liver moved (``None`` when it is inside the range or too small) and what was done:
        ``liver_hu`` (the measured median) and ``liver_hu_shift``."""
        if inputs.shape[1] != len(self.windows) or int(liver.sum()) < self.min_voxels:
            return None, {}
        low, width = self.windows[self.widest]
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        wide = plain[0, self.widest]
        hu = low + wide * width
        median = float(hu[liver].median())
        info = {"liver_hu": round(median, 1)}
        if self.hu_range[0] <= median <= self.hu_range[1]:
            return None, info
        shift = self.target_hu - median
        grown = F.max_pool3d(liver[None, None].float(), (3, 3, 1), stride=1, padding=(1, 1, 0))[0, 0] > 0
        inside = grown & (wide > 0) & (wide < 1)
        adjusted = plain.clone()
        for channel, (window_low, window_width) in enumerate(self.windows):
            moved = ((hu + shift - window_low) / window_width).clamp(0.0, 1.0)
            adjusted[0, channel] = torch.where(inside, moved, plain[0, channel])
        info["liver_hu_shift"] = round(shift, 1)
        if isinstance(inputs, MetaTensor):
            adjusted = MetaTensor(adjusted, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return adjusted, info


class LiverPhaseInfod(Transform):
    """Post-processing: what ``inferer.liver_phase`` did to the volume just inferred
    (:attr:`custom.detection.inferers.ReferringSliceInferer.liver_phase_info`), merged into ``d[info_key]`` with a
    note for the record when the liver was moved."""

    def __init__(self, inferer, info_key: str = "input_harmonisation") -> None:
        self.inferer = inferer
        self.info_key = info_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        phase = dict(getattr(self.inferer, "liver_phase_info", None) or {})
        if not phase:
            return d
        info = dict(d.get(self.info_key) or {})
        notes = list(info.get("notes") or [])
        if phase.get("liver_hu_shift"):
            normaliser = self.inferer.liver_phase
            low, high = normaliser.hu_range if normaliser is not None else (float("nan"), float("nan"))
            notes.append(
                f"The liver measures {phase['liver_hu']:.0f} HU (an unenhanced, fatty or unusually enhanced liver), "
                f"outside the {low:.0f}-{high:.0f} HU the network learned: the network read the liver and its "
                f"lesions {phase['liver_hu_shift']:+.0f} HU from their stored values, keeping their contrast."
            )
        d[self.info_key] = {**info, **phase, "notes": notes}
        return d
