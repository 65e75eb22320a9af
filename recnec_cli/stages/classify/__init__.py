"""Series -> role (T1, T2, T1ce or a non-role), with a confidence and the reasons, never a guess.

Evidence, strongest first (``docs/failure-kinds.md`` kinds 6, 7, 13, 15, 16, 17):

1. site pins from a rules file (a protocol name the site knows);
2. hard tags: non-MR Modality, ImageType LOCALIZER / DERIVED / MPR / MIP / SUB / ADC ...
   (DICOM PS3.3 C.7.6.1.1.2 and C.8.13.1.1.1), 4D series, diffusion b-values;
3. acquisition physics: ScanningSequence (EP/IR/GR/SE, PS3.3 C.8.3.1), TR, TE, TI, including the
   Enhanced MR functional groups read by :mod:`discover`. Physics decides the weighting; a name
   never overrides physics that says FLAIR, SWI/T2*, PD or DWI (``REJECTED_NOT_T2``);
4. description / protocol / sequence / file-name tokens (multilingual, kept as data in
   ``data/rules.toml``), used when the physics is absent or inconclusive; a conflict between the
   name and the physics for a model role gives ``UNDETERMINED``;
5. for T1-weighted series, contrast: ContrastBolusAgent / Ingredient / Volume, BIDS ``ce-``,
   positive and negative contrast tokens (negative wins), then at study level the acquisition
   order (after a contrast series or a perfusion bolus, the same T1 sequence repeated later), and
   finally, optionally, image evidence (:func:`~.image_evidence.enhancement_evidence`).

Every decision carries a confidence in 0..1; below ``Settings.role_confidence_threshold`` the role
is ``UNDETERMINED`` and the competing roles are listed. Library code: no Typer or Rich here.

Modules, each deciding one thing:

* :mod:`.rules`: the rules file (``data/rules.toml`` plus a site file), validated;
* :mod:`.tokens`: text normalisation, BIDS file names, token hits;
* :mod:`.series`: per-series hard tags, physics and contrast -> :func:`classify_series`;
* :mod:`.image_evidence`: HD-BET + N4 enhancement measure -> :func:`enhancement_evidence`;
* :mod:`.study`: acquisition order, image evidence and the preference order ->
  :func:`assign_roles`, :func:`inspect_study`.

Names with a leading underscore are private to their module; what these modules share with each
other is public and documented (no module imports another's `_names`).
"""

from __future__ import annotations

from .image_evidence import IMAGE_T1_MAX_PERCENT, IMAGE_T1CE_MIN_PERCENT, enhancement_evidence
from .rules import BUNDLED_RULES, Pin, Rules, default_rules, load_rules
from .series import classify_series
from .study import assign_roles, inspect_study
from .tokens import BIDS_LABEL_ENTITIES, name_text, normalise

__all__ = ["BIDS_LABEL_ENTITIES", "BUNDLED_RULES", "IMAGE_T1CE_MIN_PERCENT", "IMAGE_T1_MAX_PERCENT",
           "Pin", "Rules", "assign_roles", "classify_series", "default_rules",
           "enhancement_evidence", "inspect_study", "load_rules", "name_text", "normalise"]
