"""Pictures a person checks in seconds: per-study QC figures, explanation maps and the HTML index.

* :mod:`~recnec_cli.qc.figures`: the study picture (co-registered T1, T2, T1ce in three planes
  through the lesion, brain and lesion outlines, orientation labels, a registration check) and the
  explanation picture; matplotlib (Agg), drawn in the process that holds the volumes.
* :mod:`~recnec_cli.qc.explain`: occlusion sensitivity through the ONNX ensemble itself.
* :mod:`~recnec_cli.qc.index`: ``DIR/index.html`` from report rows (Jinja2 template shipped in
  ``recnec_cli/data/templates``).
* :mod:`~recnec_cli.qc.captions`: the header lines of the pictures (pseudonym, roles, lesion,
  probability or failure code).
* :mod:`~recnec_cli.qc.files`: file names (StudyInstanceUID or a keyed pseudonym, never a folder
  name) and crash-safe writes.

Nothing here imports the orchestration at run time (captions names its result type for
annotations only); the pipeline calls in. matplotlib and Jinja2 are imported
inside functions, so ``recnec --help`` never pays for them.
"""
