"""The stages: each module turns its inputs into outputs and knows nothing of the others' order.

``discover`` (tree -> studies, headers only), ``classify`` (series -> roles), ``convert``
(series -> canonical RAS+ volume), ``register`` (rigid onto the T1ce, common grid), ``skullstrip``
(HD-BET brain mask), ``lesion`` (user mask or automatic enhancing lesion), ``modelinput`` (the
model's box), ``infer`` (ONNX ensemble). They are chained in one place only:
:mod:`recnec_cli.orchestration.pipeline`.
"""
