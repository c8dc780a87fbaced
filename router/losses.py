"""Router losses besides cross-entropy.

* Switch-Transformer load balancing (Fedus et al. 2021): L_bal = E * sum_i f_i * P_i, where f_i is the
  fraction of rows whose top-1 column is i and P_i the mean gate probability of column i. It is 1.0 when
  routing is uniform and grows to E when everything collapses onto one column. Coefficient 0.01 (the paper's).
* Router z-loss (Zoph et al. 2022, ST-MoE): L_z = mean(logsumexp(logits)^2); keeps logits small so the
  softmax stays numerically tame and calibration does not drift. Coefficient 1e-3 (the paper's).
* Distillation (Li & Hoiem 2016, learning without forgetting): KL(teacher || student) on the rows that only
  replay what the active router already knew. A warm-started candidate then moves only where new labels
  (feedback, a new expert's prompts) pull it, instead of wandering by training noise on everything else.
"""

from __future__ import annotations

import torch

LOAD_BALANCE_COEF = 0.01
Z_LOSS_COEF = 1e-3


def load_balancing_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, E] -> scalar; 1.0 for a perfectly balanced batch, E for a collapsed one."""
    probs = torch.softmax(logits, dim=-1)
    num = logits.shape[-1]
    dispatch = torch.nn.functional.one_hot(probs.argmax(-1), num).float().mean(0)  # f_i, [E]
    importance = probs.mean(0)  # P_i, [E]
    return num * (dispatch * importance).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def router_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    load_balance_coef: float = LOAD_BALANCE_COEF,
    z_loss_coef: float = Z_LOSS_COEF,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    ce = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    bal = load_balancing_loss(logits)
    z = z_loss(logits)
    total = ce + load_balance_coef * bal + z_loss_coef * z
    return total, {"ce": ce.detach().item(), "load_balance": bal.detach().item(), "z": z.detach().item()}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """student/teacher logits [N, E], mask [N] bool -> mean KL(teacher || student) over the masked rows (0 if none)."""
    if not bool(mask.any()):
        return student_logits.new_zeros(())
    student = torch.log_softmax(student_logits[mask], dim=-1)
    teacher = torch.log_softmax(teacher_logits[mask], dim=-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
