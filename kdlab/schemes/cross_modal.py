"""Cross-modal distillation: the teacher sees one modality, the student another of the same sample
(Gupta, Hoffman, Malik, "Cross Modal Distillation for Supervision Transfer", CVPR 2016).

Offline distillation over a paired data module (``paired_mnist1d``: signal -> time-frequency
image; ``paired_imagefolder``: e.g. RGB -> depth). Samples marked ``labelled=False`` give the
student no label: the teacher is its only supervision there, so methods that read labels (DKD,
CRD) are refused when the data holds such samples.
"""

from __future__ import annotations

from kdlab.errors import ConfigError
from kdlab.schemes.base import SystemParts
from kdlab.schemes.offline import OfflineDistillation
from kdlab.schemes.registry import register_scheme

PAIRED_KEY = "teacher_input"


@register_scheme("cross_modal", "teacher on modality A, student on modality B of the same samples (paired data)")
class CrossModalDistillation(OfflineDistillation):
    example = "mnist1d-cross-modal"
    teachers_taken = "one"

    def __init__(self, parts: SystemParts) -> None:
        if parts.teacher_input_key != PAIRED_KEY:
            raise ConfigError(
                "cross_modal needs paired data (data.name=paired_mnist1d or paired_imagefolder), whose batches"
                " carry the teacher's modality as 'teacher_input'"
            )
        if parts.labelled_fraction < 1.0 and parts.method.uses_labels:
            raise ConfigError(
                f"cross_modal: method '{parts.method.name}' reads labels, but the student has none on part of the"
                " data; use a label-free method (kd, dist, ls_kd, a feature method)"
            )
        super().__init__(parts)
