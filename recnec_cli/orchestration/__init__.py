"""Running the stages: the one chaining point and everything around a run.

``pipeline`` chains the stages for one study and batches inference; ``report`` turns results into
rows, reports and the manifest. The stages live in :mod:`recnec_cli.stages` and never import
from here.
"""
