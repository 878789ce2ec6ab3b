"""Distillation losses as pure functions, one module per kind of knowledge.

They follow the conventions of the authors' reference code (RepDistiller for the CRD-table methods,
mdistiller for DKD, the authors' repositories for DIST and logit standardisation; TRL for GKD) and
are tested against the papers' formulas in float64. ``lm`` holds the token-level divergences of
language-model distillation.
"""

from kdlab.losses.contrastive import ContrastMemory, OtherClassSampler, crd_nce_loss
from kdlab.losses.feature import ab_loss, at_loss, attention_map, factor_transfer_loss, hint_loss, nst_loss, vid_loss
from kdlab.losses.lm import forward_kl, generalized_jsd, lm_loss, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd
from kdlab.losses.relation import cc_loss, fsp_loss, fsp_matrix, pkt_loss, rkd_loss, sp_loss
from kdlab.losses.response import dist_loss, dkd_loss, kd_loss, standardize_logits, standardized_kd_loss

__all__ = [
    "ContrastMemory",
    "OtherClassSampler",
    "ab_loss",
    "at_loss",
    "attention_map",
    "cc_loss",
    "crd_nce_loss",
    "dist_loss",
    "dkd_loss",
    "factor_transfer_loss",
    "forward_kl",
    "fsp_loss",
    "fsp_matrix",
    "generalized_jsd",
    "hint_loss",
    "kd_loss",
    "lm_loss",
    "nst_loss",
    "pkt_loss",
    "reverse_kl",
    "rkd_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sp_loss",
    "standardize_logits",
    "standardized_kd_loss",
    "tvd",
    "vid_loss",
]
