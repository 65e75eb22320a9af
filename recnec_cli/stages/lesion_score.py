"""How much each component the segmenter calls enhancing looks like a lesion: a logistic score.

The segmenter (:mod:`recnec_cli.stages.segment`) marks, on real and synthetic heads alike, small
enhancing components that are not lesions: the choroid plexus above all, with CSF labelled as a
necrotic core beside it. Its own mean probability does not tell them apart (on 24 synthetic heads
with lesions and 8 without, seed 9002: lesions 0.72-0.86, false components 0.66-0.80). This module
scores every candidate component from nine measurements and a logistic regression fitted on
synthetic heads (:mod:`recnec_cli.train.lesion_score`); the scan takes the largest credible
component (:func:`recnec_cli.stages.segment.lesion_from_segmentation`), reports its score as
``lesion_confidence`` and calls a study without a component scoring :data:`MIN_LESION_SCORE`
``NO_ENHANCING_LESION``.

Measurements (:data:`FEATURES`, one row per component; z-scores are robust, inside the brain):

``log_enhancing_ml``
    ln of the component's enhancing volume (mL).
``log1p_core_ml``, ``log1p_oedema_ml``
    ln(1 + mL) of its non-enhancing core (holes filled) and of the oedema connected to it.
``mean_probability``
    the segmenter's mean probability of its own label over the component.
``roundness``
    :func:`recnec_cli.stages.lesion.roundness` of the filled component (1 a ball; tubes and sheets low).
``shell_oedema``, ``shell_csf``
    fractions of the 6 mm shell around it that are T2-bright and not T1-dark (oedema) or T2-bright
    and T1-dark (CSF) (:class:`recnec_cli.stages.lesion.ShellEvidence`; needs T1 and T2).
``flair_oedema_z``
    median z(FLAIR) over its connected oedema, clipped to [-5, 5]; 0 without FLAIR or oedema (the
    choroid plexus's neighbour is CSF, bright on T2 and dark on FLAIR; oedema is bright on both).
``heuristic_agrees``
    1 when the heuristic detector's lesion centroid lies inside the component, else 0.

How strongly a region enhances (z(T1ce) - z(T1)) was a measurement too and is left out: on
synthetic heads the choroid plexus enhances more than the lesions, so the fit learnt that strong
enhancement means "not a lesion", and a clean, strongly enhancing sphere without oedema (a solid
metastasis; the test phantoms) then scored 0.18-0.26 and was rejected or passed over.

A measurement that cannot be made (no T1 or T2: only in benchmarks, the scan requires both) is set
to its training mean, i.e. it does not move the score. Depth below the brain surface separates
the synthetic choroid plexus even better but is left out on purpose: real deep tumours (thalamic,
periventricular, butterfly gliomas) are common, and the synthetic lesions' depths say nothing about
theirs.

Where the score comes from and what it is worth: ``weights/lesion_score.json`` (written by
``recnec train-segmenter --lesion-score-only``) holds the standardisation, coefficients, the
segmenter it was fitted for and its own checksum. It is the probability, on synthetic heads, that a
component overlaps the reference lesion; on patients it is a ranking with a threshold, not a
calibrated probability.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import EnvironmentBroken, InferenceError
from ..types import Affine, MaskRAS, VolumeRAS

log = logging.getLogger(__name__)

LESION_SCORE_FILE = "lesion_score.json"
LESION_SCORE_FORMAT = "recnec-lesion-score/1"
FEATURES = ("log_enhancing_ml", "log1p_core_ml", "log1p_oedema_ml", "mean_probability", "roundness",
            "shell_oedema", "shell_csf", "flair_oedema_z", "heuristic_agrees")
#: a component scoring below this is not a lesion; a study with none left is ``NO_ENHANCING_LESION``.
#: 0.2 rejected a 3.4 mL synthetic lesion with oedema (score 0.17, a ``recnec synth`` DICOM study
#: of the test suite): a wrong rejection loses the study, a low score only flags it. With 0.1, on
#: the benchmark's heads (seed 9002, never used in fitting) 1 of 8 lesion-free heads had no
#: component above it and 5 of the other 7 were flagged :data:`recnec_cli.stages.lesion.LOW_CONFIDENCE`.
MIN_LESION_SCORE = 0.1


def _digest(body: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the fitted numbers (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fitted_body(*, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float) -> dict[str, Any]:
    """The numbers a :class:`LesionScore` needs, rounded to 4 decimals (so that a refit on another
    thread count, whose features differ in the last bits, writes the same file)."""
    return {"features": list(FEATURES), "mean": [round(float(v), 4) for v in mean],
            "scale": [round(float(v), 4) for v in scale], "coef": [round(float(v), 4) for v in coef],
            "intercept": round(float(intercept), 4)}


@dataclass(frozen=True)
class LesionScore:
    """A fitted logistic score (module docstring): ``mean``, ``scale``, ``coef`` float ``(F,)`` in the
    order of :data:`FEATURES`; ``checksum`` the SHA-256 of its numbers (its identity in fingerprints)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    checksum: str
    segmenter_sha256: str

    @classmethod
    def load(cls, path: Path) -> "LesionScore":
        """Read and verify ``path`` (a ``lesion_score.json``).

        Raises
        ------
        EnvironmentBroken
            ``WEIGHTS_MANIFEST_INVALID`` when it is unreadable or not a recnec lesion score.
        InferenceError
            ``WEIGHTS_CHECKSUM_MISMATCH`` when its numbers differ from its checksum.
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            body = doc["fitted"]
            ok = doc.get("format") == LESION_SCORE_FORMAT and tuple(body["features"]) == FEATURES
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EnvironmentBroken(f"cannot read {path}: {exc}", code="WEIGHTS_MANIFEST_INVALID") from None
        if not ok:
            raise EnvironmentBroken(f"{path} is not a recnec lesion score ({LESION_SCORE_FORMAT}, features "
                                    f"{', '.join(FEATURES)})", code="WEIGHTS_MANIFEST_INVALID")
        if _digest(body) != doc.get("checksum"):
            raise InferenceError(f"the numbers in {path} do not match its checksum: the file was modified or "
                                 "corrupted; refusing to use it", code="WEIGHTS_CHECKSUM_MISMATCH")
        return cls(mean=np.asarray(body["mean"], float), scale=np.asarray(body["scale"], float),
                   coef=np.asarray(body["coef"], float), intercept=float(body["intercept"]),
                   checksum=str(doc["checksum"]), segmenter_sha256=str(doc.get("segmenter_sha256", "")))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] of ``features`` float ``(N, F)`` (NaN = not measured: the training mean)."""
        x = np.asarray(features, dtype=float).reshape(-1, len(FEATURES))
        x = np.where(np.isfinite(x), x, self.mean)
        logit = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logit))


def write_lesion_score(path: Path, body: Mapping[str, Any], **about: Any) -> Path:
    """Write a ``lesion_score.json``: ``body`` (:func:`fitted_body`), its checksum and ``about``
    (how it was made: command, seed, counts, segmenter_sha256, ...). Returns ``path``."""
    from ..atomic import atomic_write_text

    doc = {"format": LESION_SCORE_FORMAT, **about, "fitted": dict(body), "checksum": _digest(body)}
    atomic_write_text(Path(path), json.dumps(doc, indent=2) + "\n")
    return Path(path)


class ComponentMeasurer:
    """Measures :data:`FEATURES` of candidate components in one study (z-scores computed once).

    ``labels`` / ``probability``: the segmentation (:class:`recnec_cli.stages.segment.Segmentation`'s
    ``labels`` and ``confidence``, ``(X, Y, Z)``); ``images``: float ``(X, Y, Z)`` volumes on the same
    grid by role name (``T1``, ``T2``, ``T1ce``, ``FLAIR``; ``None`` or absent when missing);
    ``brain`` bool ``(X, Y, Z)``; ``affine`` voxel -> RAS mm; ``shell`` a
    :class:`recnec_cli.stages.lesion.ShellEvidence` or ``None``; ``heuristic_centroid`` the heuristic
    detector's lesion centroid (RAS mm) or ``None``.
    """

    def __init__(self, labels: np.ndarray, probability: np.ndarray, images: Mapping[str, VolumeRAS | None],
                 brain: MaskRAS, affine: Affine, *, shell: Any = None,
                 heuristic_centroid: np.ndarray | None = None) -> None:
        from nibabel.affines import voxel_sizes

        from .intensity import robust_zscore

        self.probability = probability
        self.affine = np.asarray(affine, dtype=float)
        self.spacing = voxel_sizes(self.affine)
        self.voxel_ml = float(np.prod(self.spacing)) / 1000.0
        flair = images.get("FLAIR")
        self.flair = None if flair is None else robust_zscore(np.asarray(flair, dtype=np.float32),
                                                              np.asarray(brain, dtype=bool))
        self.shell = shell
        self.heuristic_ijk = None
        if heuristic_centroid is not None:
            ijk = np.round(np.linalg.solve(self.affine, np.append(heuristic_centroid, 1.0))[:3]).astype(int)
            if all(0 <= v < n for v, n in zip(ijk, labels.shape)):
                self.heuristic_ijk = tuple(int(v) for v in ijk)

    def __call__(self, component: MaskRAS, filled: MaskRAS, enhancing: MaskRAS, oedema: MaskRAS) -> np.ndarray:
        """Float ``(F,)`` for one component: ``component`` its enhancing + core voxels, ``filled`` with
        holes filled, ``enhancing`` its enhancing voxels, ``oedema`` the oedema connected to it (bool
        ``(X, Y, Z)`` each). NaN where a measurement cannot be made."""
        from .lesion import roundness

        enh_ml = float(np.count_nonzero(enhancing)) * self.voxel_ml
        core_ml = float(np.count_nonzero(filled & ~enhancing)) * self.voxel_ml
        oed_ml = float(np.count_nonzero(oedema)) * self.voxel_ml
        shell = self.shell(filled) if self.shell is not None else (np.nan, np.nan)
        flair_z = (float(np.clip(np.median(self.flair[oedema]), -5, 5))
                   if self.flair is not None and oedema.any() else 0.0)
        agrees = float(self.heuristic_ijk is not None and bool(filled[self.heuristic_ijk]))
        return np.array([np.log(max(enh_ml, 1e-3)), np.log1p(core_ml), np.log1p(oed_ml),
                         float(np.mean(self.probability[component])), roundness(filled, self.spacing),
                         shell[0], shell[1], flair_z, agrees], dtype=float)


def fitted_for(score_segmenter_sha256: str, segmenter_sha256: str) -> bool:
    """A lesion score recording ``score_segmenter_sha256`` may rank the components of the segmenter
    ``segmenter_sha256`` (same digest, or none recorded)."""
    return not score_segmenter_sha256 or score_segmenter_sha256 == segmenter_sha256


def find_lesion_score(folder: Path, segmenter_sha256: str) -> LesionScore | None:
    """The verified lesion score beside a segmenter (``folder/lesion_score.json``), ``None`` when
    there is none or it was fitted for another segmenter (WARNING: the scan then ranks components
    by enhancing volume and reports the segmenter's mean probability).

    Raises
    ------
    EnvironmentBroken, InferenceError
        As :meth:`LesionScore.load`.
    """
    path = Path(folder) / LESION_SCORE_FILE
    if not path.is_file():
        log.warning("no %s beside the segmenter in %s: components are ranked by enhancing volume and "
                    "lesion_confidence is the segmenter's mean probability", LESION_SCORE_FILE, folder)
        return None
    score = LesionScore.load(path)
    if not fitted_for(score.segmenter_sha256, segmenter_sha256):
        log.warning("%s was fitted for another segmenter (%s, this one %s): not used; refit it with "
                    "recnec train-segmenter --lesion-score-only", path, score.segmenter_sha256[:12],
                    segmenter_sha256[:12])
        return None
    return score

