"""The model's input recipe: one function shared by ``scan``, ``synth --space model`` and ``train``.

The recipe is written into ``weights/manifest.json`` (``input`` key) by ``recnec train`` and read
back by ``recnec scan``, so a model is always fed exactly what it was trained on. There is no
second copy of this code anywhere: train and synth call :func:`make_model_input` too.

Recipe (defaults of :class:`InputSpec`):

1. A cubic box of ``size_vox`` voxels at ``spacing_mm`` (40 x 1.5 mm = 60 mm), axis-aligned in
   world RAS+, centred on the lesion centroid (mm, RAS+).
2. Each channel (T1, T2, T1ce, all already on one co-registered grid) and the brain mask are
   sampled on that box with trilinear interpolation (``scipy.ndimage.map_coordinates``,
   order 1); samples outside the source volume are 0 and count as outside the brain.
3. Per channel, robust z-score over the brain voxels *inside the box*:
   ``(x - median) / (IQR / 1.349)`` (IQR/1.349 estimates the standard deviation of a normal
   distribution; :func:`~recnec_cli.stages.intensity.robust_zscore`, which falls back to the
   standard deviation when the IQR is degenerate), clipped to ``[-clip, clip]``; voxels outside
   the brain mask are set to 0.
   Normalising inside the brain makes the input invariant to global intensity scale
   (``docs/failure-kinds.md`` kind 11: Philips and other scaling).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..errors import LesionError
from ..types import Affine, MaskRAS, ModelInput, PointRAS, VolumeRAS
from .intensity import robust_zscore

#: minimum number of brain voxels inside the box for a meaningful normalisation
MIN_BRAIN_VOXELS = 200


@dataclass(frozen=True)
class InputSpec:
    """Model-input specification, serialised into the weights manifest.

    Attributes
    ----------
    channels:
        Channel order of the tensor (default T1, T2, T1ce).
    size_vox:
        Box size in voxels along (R, A, S).
    spacing_mm:
        Isotropic voxel size of the box in mm.
    clip:
        Normalised values are clipped to ``[-clip, clip]``.
    normalisation:
        Name of the normalisation (only ``robust_zscore_in_brain_box`` exists).
    """

    channels: tuple[str, ...] = ("T1", "T2", "T1ce")
    size_vox: tuple[int, int, int] = (40, 40, 40)
    spacing_mm: float = 1.5
    clip: float = 5.0
    normalisation: str = "robust_zscore_in_brain_box"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Tensor shape ``(C, X, Y, Z)`` of one study."""
        return (len(self.channels), *self.size_vox)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["size_vox"] = list(self.size_vox)
        d["shape"] = list(self.shape)
        d["axis_order"] = "C, X (towards Right), Y (Anterior), Z (Superior); world RAS+"
        d["interpolation"] = "trilinear; outside the source volume = 0 and outside the brain"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputSpec":
        """The spec of a weights manifest's ``input`` entry (:meth:`to_dict` output).

        Raises
        ------
        ValueError
            An unknown ``normalisation`` or a non-numeric value.
        KeyError
            A missing ``channels``, ``size_vox``, ``spacing_mm`` or ``clip``.
        """
        if d.get("normalisation", "robust_zscore_in_brain_box") != "robust_zscore_in_brain_box":
            raise ValueError(f"unknown normalisation {d.get('normalisation')!r}")
        return cls(
            channels=tuple(d["channels"]),
            size_vox=tuple(int(v) for v in d["size_vox"]),  # type: ignore[arg-type]
            spacing_mm=float(d["spacing_mm"]),
            clip=float(d["clip"]),
        )


def box_affine(centre_ras_mm: PointRAS, spec: InputSpec) -> Affine:
    """Voxel -> world (mm, RAS+) affine of the model-input box centred on ``centre_ras_mm``."""
    n = np.asarray(spec.size_vox, dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] *= spec.spacing_mm
    aff[:3, 3] = np.asarray(centre_ras_mm, dtype=np.float64) - (n - 1) / 2.0 * spec.spacing_mm
    return aff


def _sample(volume: np.ndarray, vox_coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = ndimage.map_coordinates(
        np.asarray(volume, dtype=np.float32), vox_coords, order=1, mode="constant", cval=0.0,
        prefilter=False,
    )
    return out.reshape(shape).astype(np.float32)


def make_model_input(
    channels: Sequence[VolumeRAS],
    brain_mask: MaskRAS,
    affine: Affine,
    centre_ras_mm: PointRAS,
    spec: InputSpec = InputSpec(),
) -> ModelInput:
    """Crop, resample and normalise co-registered volumes into one model-input tensor.

    Parameters
    ----------
    channels:
        One volume per ``spec.channels`` entry, in that order; each float array of shape
        ``(X, Y, Z)`` on the same canonical RAS+ grid described by ``affine``.
    brain_mask:
        Boolean (or 0/1) array, shape ``(X, Y, Z)``, same grid; True inside the brain.
    affine:
        ``(4, 4)`` voxel -> world (mm, RAS+) affine shared by all inputs.
    centre_ras_mm:
        Box centre in world mm, RAS+ (normally the lesion centroid).
    spec:
        The recipe (from the weights manifest).

    Returns
    -------
    numpy.ndarray
        float32, shape ``spec.shape`` = ``(C, X, Y, Z)``, axes RAS+.

    Raises
    ------
    ValueError
        If the number of channels or the array shapes do not match.
    LesionError
        ``CROP_OUTSIDE_BRAIN`` if fewer than 200 brain voxels fall inside the box.
    """
    if len(channels) != len(spec.channels):
        raise ValueError(f"expected {len(spec.channels)} channels, got {len(channels)}")
    shape = np.shape(brain_mask)
    for c in channels:
        if np.shape(c) != shape:
            raise ValueError(f"channel shape {np.shape(c)} differs from mask shape {shape}")
    box = box_affine(centre_ras_mm, spec)
    vox2vox = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ box
    grid = np.indices(spec.size_vox, dtype=np.float64).reshape(3, -1)
    coords = vox2vox[:3, :3] @ grid + vox2vox[:3, 3:4]
    mask = _sample(np.asarray(brain_mask, dtype=np.float32), coords, spec.size_vox) > 0.5
    if int(mask.sum()) < MIN_BRAIN_VOXELS:
        raise LesionError(
            f"only {int(mask.sum())} brain voxels inside the {spec.size_vox} model box "
            f"(need {MIN_BRAIN_VOXELS}); the lesion centre lies outside the brain mask",
            code="CROP_OUTSIDE_BRAIN",
        )
    out = np.zeros(spec.shape, dtype=np.float32)
    for ci, vol in enumerate(channels):
        x = _sample(vol, coords, spec.size_vox)
        z = np.clip(robust_zscore(x, mask), -spec.clip, spec.clip)
        z[~mask] = 0.0
        out[ci] = z
    return out
