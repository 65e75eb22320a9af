"""Type aliases that spell out geometry once (docs/code-style.md habit 4).

* ``VolumeRAS``: float32 array, shape ``(X, Y, Z)``, indexed ``[i, j, k]`` with ``i`` towards the
  patient's Right, ``j`` Anterior, ``k`` Superior (nibabel canonical, RAS+).
* ``MaskRAS``: bool/uint8 array of the same shape and grid as its volume.
* ``Affine``: float64 ``(4, 4)`` matrix mapping voxel indices ``(i, j, k, 1)`` to world
  coordinates in mm, RAS+ (NIfTI convention). DICOM positions (LPS) are converted once.
* ``PointRAS``: ``(3,)`` world coordinate in mm, RAS+.
* ``ModelInput``: float32 array, shape ``(C, X, Y, Z)`` with channels in the manifest's order
  (T1, T2, T1ce by default), spatial axes RAS as above.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

VolumeRAS = npt.NDArray[np.float32]
MaskRAS = npt.NDArray[np.bool_]
Affine = npt.NDArray[np.float64]
PointRAS = npt.NDArray[np.float64]
ModelInput = npt.NDArray[np.float32]
