"""Token-level divergences between a target and a draft distribution, and the acceptance α.

Glossary (DistillSpec, Zhou et al. 2023; Leviathan et al. 2023):
- p is the target's next-token distribution, q the draft's; both come from logits divided by a
  temperature T.
- forward KL  ``fkl``: KL(p ‖ q) = Σ p (log p − log q). Mass-covering: q must cover p's support.
- reverse KL  ``rkl``: KL(q ‖ p) = Σ q (log q − log p). Mode-seeking.
- JSD(β)      ``jsd``: β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q, 0 < β < 1.
- total variation ``tvd``: ½ Σ |p − q|.
- α = Σ min(p, q) = 1 − TVD is the chance that speculative sampling accepts a token drawn from
  q (Leviathan et al., Theorem 3.5), so minimising ``tvd`` maximises α directly.

Every function takes logits of shape [N, V] (N positions, V vocabulary) and returns one value per
position, shape [N], in float32. Callers choose the positions (response tokens) and the reduction.
This module knows nothing about models, batches or tokenizers.
"""
import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per row from log-probabilities [N, V] -> [N]."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def divergence(target_logits: torch.Tensor, draft_logits: torch.Tensor, kind: str = "fkl",
               beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """D(p, q) per position, p = softmax(target_logits / T), q = softmax(draft_logits / T).

    Example:
        >>> t = torch.tensor([[2.0, 0.0]]); d = torch.tensor([[0.0, 2.0]])
        >>> divergence(t, t, "fkl")       # identical distributions
        tensor([0.])
        >>> divergence(t, d, "tvd")       # p = (.88, .12), q = (.12, .88)
        tensor([0.7616])
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)  # [N, V]
    log_q = F.log_softmax(draft_logits.float() / temperature, dim=-1)   # [N, V]
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"JSD needs 0 < beta < 1, got {beta}")
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """α = Σ_v min(p_v, q_v) per position [N, V] -> [N]: the expected acceptance of one drafted token."""
    p = F.softmax(target_logits.float() / temperature, dim=-1)
    q = F.softmax(draft_logits.float() / temperature, dim=-1)
    return torch.minimum(p, q).sum(-1)
