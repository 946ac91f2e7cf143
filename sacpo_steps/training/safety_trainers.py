"""The trainers of the one-stage safe losses: SafeDPO and BSO (heavy: TRL and torch).

Both train on helpfulness pairs transformed by `safe_pairs.transform` (the preferred
answer is always safe) and read each pair's margin M = Delta * (h_l - h_w) from the
`safety_margin` column. With m = (log pi/pi_ref)(y_w) - (log pi/pi_ref)(y_l), each
log-ratio summed over the answer's tokens:

- SafeDPO (arXiv 2505.20065, Eq. 11-12 of v2): -log sigmoid(beta * m - M). TRL's DPO
  loss computes it exactly when the reference log-prob of y_w is raised by M / beta,
  since beta * (m - M / beta) = beta * m - M; so TRL's own loss runs, on shifted
  reference columns (its logged rewards include the shift). Delta = 0: DPO on T(D).
- BSO (arXiv 2605.12339, Bregman Safety Optimization): with log R = -(beta * m - M),
  the loss of a convex generator f is f'(R) R - f(R) - f'(1/R). Its logistic member,
  log(1 + R), is SafeDPO; the default member the BSO authors train with is the scaled
  Basu power SBA(lambda, s), f(R) = (R^(1+l) - R) / (s l (l+1)), whose loss is
  (l R^(1+l) - (1+l) R^(-l) + 1) / (s l (l+1)). The formulas were taken from the
  abstract of arXiv 2605.12339v1 and a public re-implementation that cites its
  equations 12, 14, 16 and 23 (its body could not be read here), and checked by hand:
  the loss above follows from f, and the logistic member equals SafeDPO (a test).
  Like the authors' code, log R is clamped to [-30, 30] before the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import DPOTrainer

from sacpo_steps.models import trl_adapter
from sacpo_steps.training.safe_pairs import MARGIN

#: the range log R is clamped to before BSO's loss (the authors' choice; R^(1+l) of
#: e^30 stays finite in float32)
LOG_R_CLAMP = 30.0
#: SBA's lambda and scale, the BSO authors' setting for their smallest model
SBA_LAMBDA, SBA_SCALE = 0.2, 4.0


def _margin_batch(trainer: DPOTrainer, inputs: dict) -> torch.Tensor:
    margin = inputs.pop(MARGIN)
    if "ref_chosen_logps" not in inputs:
        raise RuntimeError(f"{type(trainer).__name__} needs the reference log-probs in the "
                           "batch: training.precompute_ref_log_probs must be true")
    return margin.to(inputs["ref_chosen_logps"].device, inputs["ref_chosen_logps"].dtype)


class _SafeDPOTrainer(DPOTrainer):
    """TRL's sigmoid DPO on shifted reference log-probs: -log sigmoid(beta m - M)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin = _margin_batch(self, inputs)
        inputs["ref_chosen_logps"] = inputs["ref_chosen_logps"] + margin / self.beta
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def logistic_loss(log_r: torch.Tensor) -> torch.Tensor:
    """BSO's logistic member, log(1 + R): SafeDPO's loss."""
    return F.softplus(log_r)


def sba_loss(log_r: torch.Tensor, lam: float = SBA_LAMBDA, scale: float = SBA_SCALE
             ) -> torch.Tensor:
    """BSO's scaled Basu power member: (l R^(1+l) - (1+l) R^(-l) + 1) / (s l (l+1))."""
    return (lam * torch.exp((1 + lam) * log_r) - (1 + lam) * torch.exp(-lam * log_r) + 1) \
        / (scale * lam * (lam + 1))


class _BSOTrainer(DPOTrainer):
    """BSO's loss on the DPO trainer's batches, its policy log-probs computed as TRL's
    are (`trl_adapter.sequence_logps`); the reference log-probs come precomputed."""

    pair_loss = staticmethod(sba_loss)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin = _margin_batch(self, inputs)
        chosen, rejected = trl_adapter.sequence_logps(self, model, inputs)
        m = (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
        log_r = torch.clamp(-(self.beta * m - margin), -LOG_R_CLAMP, LOG_R_CLAMP)
        loss = self.pair_loss(log_r).mean()
        with torch.no_grad():
            gathered = self.accelerator.gather_for_metrics(m.detach())
            trl_adapter.log_metric(self, "rewards/margins", self.beta * gathered.mean().item())
            trl_adapter.log_metric(self, "rewards/accuracies",
                                   (gathered > 0).float().mean().item())
        if return_outputs:
            raise ValueError("BSO's trainer returns no outputs (no evaluation metrics)")
        return loss


SafeDPOTrainer = trl_adapter.with_row_column(_SafeDPOTrainer, MARGIN, module=__name__)
BSOTrainer = trl_adapter.with_row_column(_BSOTrainer, MARGIN, module=__name__)
