"""Speculative sampling preserves the target's distribution (chi-square on a toy model).

A vocabulary-8 target makes the joint law of the first two sampled tokens a 64-cell table we
can compute exactly from the target's own logits. Thousands of rows of one batch give the
empirical table; a chi-square test must not reject. A deliberately wrong rule (accept every
draft token) must be rejected by the same test, which shows the test has power.
"""
import pytest
import torch
from scipy.stats import chisquare
from tiny import make_tiny

import specdec
from specdec.drafters import DraftModel, DraftSpec, Drafter, LayerSkip, PromptLookup
from specdec.verifiers import DraftTree
from specdec.verifiers.acceptance import SamplingParams, SpeculativeSampling, warp_probs

V = 8
ROWS = 6000
PROMPT = [3, 5, 3, 5, 3, 6, 3]  # repeats, so lookup proposes real drafts


def exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """P(t1, t2 | prompt) under the warped target, as a [V, V] table."""
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        p1 = warp_probs(model(ids).logits[0, -1], params)
        seqs = torch.cat([ids.repeat(V, 1), torch.arange(V).unsqueeze(1)], dim=1)
        p2 = warp_probs(model(seqs).logits[:, -1], params)
    return p1.unsqueeze(1) * p2


def sampled_joint(spec, params: SamplingParams) -> torch.Tensor:
    ids = torch.tensor([PROMPT]).repeat(ROWS, 1)
    out = spec.generate(ids, max_new_tokens=2, do_sample=True, temperature=params.temperature,
                        top_k=params.top_k or 0, top_p=params.top_p or 1.0, pad_token_id=0, eos_token_id=None)
    t1, t2 = out[:, len(PROMPT)], out[:, len(PROMPT) + 1]
    return torch.bincount(t1 * V + t2, minlength=V * V).view(V, V).double()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double().flatten() * counts.sum()
    keep = expected > 0
    # Cells with zero probability must never be sampled.
    assert counts.flatten()[~keep].sum() == 0
    # Merge cells with small expectations, the usual validity condition for chi-square.
    small = expected < 5
    obs = torch.cat([counts.flatten()[keep & ~small], counts.flatten()[keep & small].sum().view(1)])
    exp = torch.cat([expected[keep & ~small], expected[keep & small].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.fixture(scope="module")
def target():
    return make_tiny("llama", vocab_size=V, init_range=0.15, seed=11)


PARAMS = [SamplingParams(True, 1.0), SamplingParams(True, 0.7, top_k=5, top_p=0.9)]


class FixedTree(Drafter):
    """A static template tree with duplicate sibling tokens (point masses):

    root -> 3 -> {5, 5, 3}; root -> 3 (a duplicate of node 0) -> 6; root -> 6.
    """

    spec = DraftSpec(num_nodes=7)

    def propose(self, ctx):
        b = ctx.tokens.shape[0]
        tokens = torch.tensor([[3, 5, 5, 3, 3, 6, 6]]).expand(b, 7)
        return DraftTree.from_paths([[0, 1], [0, 2], [0, 3], [4, 5], [6]], tokens.contiguous())


def drafter_for(kind):
    draft = make_tiny("llama", vocab_size=V, init_range=0.15, seed=12)
    return {
        "draft_model": lambda: DraftModel(draft, num_tokens=3),
        "lookup": lambda: PromptLookup(num_tokens=3, max_ngram=2),
        "draft_tree": lambda: DraftModel(draft, num_tokens=2, tree_width=3, tree_nodes=7),
        "lookup_branches": lambda: PromptLookup(num_tokens=2, max_ngram=2, num_branches=3),
        "fixed_tree_duplicates": FixedTree,
        # Self-drafts from the 2-layer target's own first layer; halting ends drafts early.
        "layerskip": lambda: LayerSkip(exit_layer=1, num_tokens=3),
        "layerskip_halting": lambda: LayerSkip(skip_layers=[0], num_tokens=3, stop_threshold=0.4),
    }[kind]()


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7_k5_p0.9"])
@pytest.mark.parametrize("kind", ["draft_model", "lookup", "draft_tree", "lookup_branches", "fixed_tree_duplicates",
                                  "layerskip", "layerskip_halting", "none"])
@pytest.mark.parametrize("steps", [1, 3], ids=["per_step", "chunked"])
def test_speculative_sampling_preserves_target(target, params, kind, steps):
    """Through the one driver, one step per sync and three: the first two tokens follow the target."""
    torch.manual_seed(1234)
    drafter = drafter_for(kind) if kind != "none" else None
    spec = specdec.wrap(target, drafter=drafter, chunk_steps=steps)
    counts = sampled_joint(spec, params)
    assert chi2_pvalue(counts, exact_joint(target, params)) > 1e-3


class AlwaysAccept(SpeculativeSampling):
    """A broken rule: keeps every draft token. Its output follows the draft, not the target."""

    def accept(self, logits, tree, params):
        tree.q = None
        ones = torch.ones_like(logits)
        big = ones.clone()
        big.scatter_(2, torch.cat([tree.tokens, tree.tokens[:, -1:]], 1).unsqueeze(-1), 1e4)
        return super().accept(torch.where(tree.valid.any(1).view(-1, 1, 1), big, logits), tree, params)


def test_chi_square_detects_a_biased_rule(target):
    torch.manual_seed(1234)
    params = SamplingParams(True, 1.0)
    drafter = DraftModel(make_tiny("llama", vocab_size=V, init_range=0.15, seed=12), num_tokens=3)
    spec = specdec.wrap(target, drafter=drafter)
    spec.engine._rule = lambda p: AlwaysAccept()
    counts = sampled_joint(spec, params)
    assert chi2_pvalue(counts, exact_joint(target, params)) < 1e-6


@pytest.mark.parametrize("rule", ["typical", "relaxed"])
def test_lossy_rules_say_so(target, rule):
    spec = specdec.wrap(target, drafter=PromptLookup(num_tokens=3, max_ngram=2), acceptance=rule)
    out = spec.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0,
                        eos_token_id=None, return_dict_in_generate=True)
    assert out.spec_stats.lossless is False and out.spec_stats.acceptance == rule
    assert out.sequences.shape == (1, len(PROMPT) + 8)
