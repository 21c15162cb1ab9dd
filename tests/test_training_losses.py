"""Divergences and α: literal cases, identities between them, and that minimising each one
pulls the draft onto the target."""
import math

import pytest
import torch

from specdec.training.losses import DIVERGENCES, acceptance, divergence


def _logits(*rows):
    return torch.tensor(rows, dtype=torch.float32).log()  # logits whose softmax is exactly the rows


def test_literal_values():
    p, q = _logits([0.5, 0.5]), _logits([0.9, 0.1])
    assert divergence(p, q, "fkl").item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert divergence(p, q, "rkl").item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    assert divergence(p, q, "tvd").item() == pytest.approx(0.4)
    assert acceptance(p, q).item() == pytest.approx(0.6)  # min(.5, .9) + min(.5, .1)
    m = [0.7, 0.3]  # (p + q) / 2
    jsd = 0.5 * sum(a * math.log(a / b) for a, b in zip([0.5, 0.5], m)) \
        + 0.5 * sum(a * math.log(a / b) for a, b in zip([0.9, 0.1], m))
    assert divergence(p, q, "jsd", beta=0.5).item() == pytest.approx(jsd)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_iff_equal(kind):
    logits = torch.randn(5, 11) * 3
    assert divergence(logits, logits, kind).abs().max() < 1e-6
    assert (divergence(logits, torch.randn(5, 11) * 3, kind) > 1e-3).all()


def test_identities():
    p, q = torch.randn(6, 13) * 2, torch.randn(6, 13) * 2
    assert torch.allclose(divergence(p, q, "rkl"), divergence(q, p, "fkl"))
    assert torch.allclose(divergence(p, q, "tvd"), 1 - acceptance(p, q), atol=1e-6)
    assert torch.allclose(divergence(p, q, "jsd", beta=0.3), divergence(q, p, "jsd", beta=0.7), atol=1e-6)
    bound = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))  # JSD(β) never exceeds the entropy of (β, 1 − β)
    assert (divergence(p, q, "jsd", beta=0.3) <= bound + 1e-6).all()


def test_temperature_flattens():
    p, q = torch.randn(4, 9) * 4, torch.randn(4, 9) * 4
    d = [divergence(p, q, "fkl", temperature=t).mean().item() for t in (0.5, 1.0, 4.0, 100.0)]
    assert d == sorted(d, reverse=True) and d[-1] < 1e-2


def test_bad_arguments():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(x, x, "kl")
    with pytest.raises(ValueError, match="beta"):
        divergence(x, x, "jsd", beta=1.0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_minimising_matches_target(kind):
    """Gradient descent on the draft's logits alone drives α to 1 for every divergence."""
    torch.manual_seed(0)
    target = torch.randn(3, 8) * 2
    draft = torch.zeros(3, 8, requires_grad=True)
    opt = torch.optim.Adam([draft], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        divergence(target, draft, kind).mean().backward()
        opt.step()
    assert acceptance(target, draft.detach()).min() > 0.97
