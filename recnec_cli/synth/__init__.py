"""Synthetic recurrence / radiation-necrosis cohort built on real anatomy (``recnec synth``).

Public API:

* :func:`generate_subject` -> :class:`SubjectTruth`: one subject's T1, T2, T1ce, brain and
  lesion masks on its 1 mm RAS+ head grid, with label and acquisition parameters;
* :func:`write_cohort` -> :class:`CohortInfo`: a cohort as NIfTI or DICOM studies, or as
  model-space tensors, plus ``labels.csv``, ``truth.csv`` and ``cohort.json``; with
  ``follow_ups=K`` K later studies per subject and ``follow_ups.csv`` (true compartment volumes);
* :func:`follow_up_plans`: a subject's time points (lesion evolved, head repositioned);
  :func:`compartment_volumes`: enhancing / necrotic / oedema / lesion volumes in mL.

Modules: :mod:`.anatomy` (MNI152 2009 template, deformation, skull and scalp), :mod:`.lesions`
(imaging signs of recurrence and necrosis, with their sources), :mod:`.contrast` (tissue
intensities, bias, noise), :mod:`.acquisition` (vendor headers and sequence parameters),
:mod:`.series` (acquisition geometry), :mod:`.dicom` / :mod:`.writers` (files).
Same seed, same bytes; subject ``i`` of a seed never depends on the cohort size.
"""

from __future__ import annotations

from .subject import DEFAULT_RATIO, GENERATOR_VERSION, LABELS, cohort_label, follow_up_plans
from .truth import SubjectTruth, compartment_volumes, generate_subject
from .writers import CohortInfo, parse_ratio, write_cohort

__all__ = ["CohortInfo", "DEFAULT_RATIO", "GENERATOR_VERSION", "LABELS", "SubjectTruth",
           "cohort_label", "compartment_volumes", "follow_up_plans", "generate_subject",
           "parse_ratio", "write_cohort"]
