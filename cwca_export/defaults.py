"""Calibration defaults shared by the verbs (README, "Calibration defaults"), in one place.

No imports, so ``--help`` can read them without loading torch.

``score`` and ``compress`` draw the same calibration set by default (the statistics a method
compresses with are the ones its scores were measured on). Two verbs differ on purpose:
``refine`` runs one forward over its set per whole-plan measurement (up to ``--max-evals``), so
it defaults to a set 16x smaller in tokens; ``export``'s budget search prices every candidate by
calibration loss on its own smaller set.
"""

CALIBRATION_SAMPLES = 128  # --samples of score and compress
CALIBRATION_SEQ_LEN = 512  # --seq-len of score and compress

REFINE_SAMPLES = 32  # --samples of refine: whole-plan forwards repeat over this set
REFINE_SEQ_LEN = 128  # --seq-len of refine

EXPORT_SAMPLES = 32  # --samples of export (budget-search pricing)
EXPORT_SEQ_LEN = 256  # --seq-len of export
EXPORT_SIGNIFICANCE = 2.0  # --significance of export: a plain storage is passed over beyond this (docs/design.md 3.4)
