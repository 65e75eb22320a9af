"""recnec: batch scanner for tumour recurrence versus radiation necrosis after glioma radiotherapy.

Research software. The shipped weights are trained on a reproducible *synthetic* cohort built on
real anatomy; they are not clinically validated and must not guide treatment.
"""

__version__ = "0.3.0.dev0"

DISCLAIMER = (
    "RESEARCH USE ONLY. The shipped recnec weights were trained on a synthetic cohort "
    "(real MNI152 anatomy with simulated lesions), not on patients with known outcomes. "
    "They are not clinically validated and must not be used for diagnosis or treatment decisions."
)
