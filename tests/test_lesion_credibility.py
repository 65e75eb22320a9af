"""No credible lesion is a status, not a box on a vessel (issue 19): a T1ce whose only enhancing
structures are the normal ones (cortical veins and a dural sinus as tubes, the choroid plexus in
ventricular CSF) gets ``NO_ENHANCING_LESION``; with a real lesion added, the lesion is found and
the row carries a ``lesion_confidence``. Real pipeline steps on phantom studies; only HD-BET is
replaced (slow and not ours)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from recnec_cli.config import resolve_settings
from recnec_cli.orchestration.pipeline import Resources, process_study
from recnec_cli.stages import lesion as lesion_stage
from recnec_cli.stages.discover import discover

import phantoms

LESION = (-30.0, 20.0, 10.0)


def _tube(xyz: np.ndarray, a, b, radius: float) -> np.ndarray:
    """Voxels within ``radius`` mm of the segment a-b (world mm)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    p = xyz.reshape(3, -1).T - a
    d = b - a
    t = np.clip(p @ d / (d @ d), 0.0, 1.0)
    return (np.linalg.norm(p - t[:, None] * d, axis=1) <= radius).reshape(xyz.shape[1:])


def write_study(folder: Path, *, with_lesion: bool) -> Path:
    """The phantom head (brain ellipsoid, skull) with ventricles (CSF: dark T1, bright T2), a
    choroid plexus (4 mm ball in the left ventricle), a sinus-like tube (4 mm radius, 100 mm long,
    near the vertex) and two cortical-vein-like tubes (1.5 mm): all enhance on the T1ce only.
    ``with_lesion``: a 9 mm enhancing lesion with 6 mm of T2-bright oedema as well."""
    rng = np.random.default_rng(1)
    shape, aff = phantoms.SHAPE, phantoms.phantom_affine()
    ijk = np.indices(shape).reshape(3, -1)
    xyz = (aff[:3, :3] @ ijk + aff[:3, 3:4]).reshape(3, *shape)
    rho = np.sqrt(((xyz / np.asarray(phantoms.BRAIN_RADII_MM).reshape(3, 1, 1, 1)) ** 2).sum(0))
    brain, skull = rho <= 1.0, (rho > 1.05) & (rho <= 1.18)
    vent = np.zeros(shape, bool)
    for cx in (-14.0, 14.0):
        vent |= (((xyz - np.asarray([cx, 0.0, 5.0]).reshape(3, 1, 1, 1)) / np.asarray([10.0, 25.0, 11.0])
                  .reshape(3, 1, 1, 1)) ** 2).sum(0) <= 1.0
    plexus = np.linalg.norm(xyz - np.asarray([-14.0, 0.0, 5.0]).reshape(3, 1, 1, 1), axis=0) <= 4.0
    vessels = (_tube(xyz, (0, -50, 40), (0, 50, 40), 4.0) | _tube(xyz, (40, -30, 20), (45, 20, 25), 1.5)
               | _tube(xyz, (-45, -20, -10), (-40, 30, 0), 1.5)) & brain
    d = np.linalg.norm(xyz - np.asarray(LESION).reshape(3, 1, 1, 1), axis=0)
    les, oedema = d <= 9.0, (d > 9.0) & (d <= 15.0)
    texture = np.sin(xyz[0] / 7.0) * np.cos(xyz[1] / 9.0) * np.sin(xyz[2] / 5.0)
    folder.mkdir(parents=True, exist_ok=True)
    for role, (b, csf, enh) in {"T1w": (100.0, 30.0, None), "T2w": (60.0, 150.0, None),
                                "ce-gadolinium_T1w": (100.0, 30.0, 260.0)}.items():
        v = np.zeros(shape, np.float32)
        v[brain] = b * (1.0 + 0.15 * texture[brain])
        v[skull] = 160.0
        v[vent] = csf
        if enh is not None:
            v[plexus | vessels] = enh
        else:
            v[plexus] = b  # the plexus itself is tissue on T1 / T2
        if with_lesion:
            if role == "T2w":
                v[oedema & brain] = 110.0
            v[les] = enh if enh is not None else (90.0 if role == "T1w" else 140.0)
        v += rng.normal(0, 2.0, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.clip(v, 0, None), aff), str(folder / f"{folder.name}_{role}.nii.gz"))
    return folder


def _run(folder: Path):
    settings = resolve_settings({"device": "cpu", "threads": 1}, environ={})
    study = discover(folder.parent, settings=settings)[0]
    res = Resources.load(settings, need_model=False, need_hdbet=False)
    res.hdbet = phantoms.FakeHdBet()
    return process_study(study, settings=settings, resources=res)


@pytest.mark.slow  # the real pipeline steps (registration included) on a phantom
def test_only_normally_enhancing_structures_give_no_enhancing_lesion(tmp_path):
    r = _run(write_study(tmp_path / "s" / "vessels", with_lesion=False))
    assert r.status == "NO_ENHANCING_LESION" and r.failed_stage == "lesion", (r.status, r.error_message)
    assert "normally enhancing" in r.error_message
    assert r.preprocessed is None and r.probability is None


@pytest.mark.slow  # the real pipeline steps (registration included) on a phantom
def test_the_lesion_among_them_is_found_with_its_confidence(tmp_path):
    r = _run(write_study(tmp_path / "s" / "lesion", with_lesion=True))
    assert r.ok, (r.status, r.error_message)
    p = r.preprocessed
    # inside the 9 mm lesion, well away from its edge (2.5 mm voxels)
    assert np.linalg.norm(np.asarray(p.lesion_centroid_ras_mm) - LESION) <= 5.0, p.lesion_centroid_ras_mm
    assert p.brain_mask_source == "hdbet"  # the sinus touching the mask border is a tube: no growth
    assert 0.5 <= p.lesion_confidence <= 1.0
    assert lesion_stage.LOW_CONFIDENCE_FLAG not in p.flags


def test_confidence_formula():
    """``(1 - runner_up_ratio) * min(1, roundness / 0.5)``; a user mask is 1."""
    m = np.zeros((4, 4, 4), bool)
    les = lesion_stage.Lesion(m, np.zeros(3), 1.0, "heuristic", runner_up_ratio=0.6, roundness=0.25)
    assert abs(les.confidence - 0.4 * 0.5) < 1e-9
    assert lesion_stage.Lesion(m, np.zeros(3), 1.0, "user").confidence == 1.0
    assert lesion_stage.Lesion(m, np.zeros(3), 1.0, "heuristic", runner_up_ratio=0.0, roundness=0.9).confidence == 1.0
