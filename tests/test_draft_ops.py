"""A draft phase costs what its layer count says (issue 15), in aten ops: the CPU proxy for kernel
launches on a launch-bound GPU (``specdec.perf.count_step_ops``, phase ``draft``).

Invariants, greedy and sampled, on tiny llamas:

- A self-draft through E of a target's L layers (LayerSkip; Kangaroo, its halting variant)
  drafting γ tokens issues at most ``1.2 × (E / L) × plain-step ops × γ + STEP_SELF`` ops.
- Tighter, token by token: a drafted token costs E decoder layers (the plain step's per-layer
  ops each), the forward's fixed part (embedding, rotary tables, final norm, LM head: the plain
  step's ``forward`` phase), its choice (an argmax, or warping and drawing: counted on its own),
  one cache-length write, and for halting its top probability (a softmax and a max). The chain's
  layout costs a constant once per step. Nothing else may grow with γ: a mask or index tensor
  rebuilt per token does not fit (the old draft loop paid 4 to 12 such ops a token).
- A ``DraftModel`` drafting γ tokens issues at most ``1.2 × γ × (the draft model's plain-step
  ops)``, and the same token-by-token form with the draft model's own layers; an adaptive γ runs
  the same static budget of forwards.
- No draft phase waits for the host.
"""
import pytest
import torch
from tiny import make_tiny

import specdec
from specdec.drafters import DraftModel, LayerSkip, make_drafter
from specdec.perf import _OpCounter, count_step_ops
from specdec.verifiers.acceptance import SamplingParams, sample, warp_probs

GAMMA = 4
# Ops a self-draft issues once per step: the chain's slots and positions (an add, two subs), the
# root's gather, the restored cache length (a copy), stacking the tokens and making the chain's
# validity a prefix (ones or a comparison, two casts, a cumprod, a clone). Measured 12.
STEP_SELF = 16
# A draft model's step also re-reads two committed tokens in its first forward: their slots,
# positions (clamped) and the mask among them, the gathers of their tokens and of the root's
# logits, and its rolled-back cache lengths; then the chain's layout, as above. Measured 22.
STEP_MODEL = 26
HALTING = 2  # per token: the draft's softmax and its top probability
PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
MODES = {"greedy": dict(do_sample=False), "sampled": dict(do_sample=True, temperature=0.7, top_p=0.9)}


def step_ops(model, drafter, mode):
    spec = specdec.wrap(model, drafter=drafter)
    torch.manual_seed(0)
    spec.generate(PROMPT, max_new_tokens=6, pad_token_id=0, eos_token_id=None, **MODES[mode])
    return count_step_ops(spec.engine._decoder)


def choice_ops(mode: str, vocab: int) -> int:
    """Ops of choosing one draft token from ``[1, V]`` logits: an argmax, or warping and a draw."""
    logits = torch.randn(1, vocab)
    counter = _OpCounter({}, {})
    with torch.no_grad(), counter:
        if mode == "greedy":
            logits.argmax(dim=-1)
        else:
            sample(warp_probs(logits, SamplingParams(**MODES[mode])))
    return sum(sum(c.values()) for c in counter.ops.values())


def per_token(plain, layers: int, mode: str, vocab: int) -> int:
    """What one drafted token through ``layers`` layers may cost, from ``plain``'s phases (a plain
    step of the model the draft runs on): its layers, the forward's fixed part, its choice, and
    one cache-length write."""
    return round(layers * plain.per_layer()) + plain.by_phase()["forward"] + choice_ops(mode, vocab) + 1


@pytest.fixture(scope="module")
def targets():
    return {layers: make_tiny("llama", num_layers=layers) for layers in (2, 4)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layers,exit_layer", [(2, 1), (4, 3)])
@pytest.mark.parametrize("kind", ["layerskip", "kangaroo"])
def test_a_self_draft_costs_its_exit_layers_per_token(targets, kind, layers, exit_layer, mode):
    model = targets[layers]
    plain = step_ops(model, None, mode)
    drafter = (LayerSkip(exit_layer=exit_layer, num_tokens=GAMMA) if kind == "layerskip" else
               make_drafter("kangaroo", exit_layer=exit_layer, num_tokens=GAMMA, stop_threshold=0.6))
    ops = step_ops(model, drafter, mode)
    drafted = ops.by_phase()["draft"]
    assert plain.by_phase()["draft"] == 0 and drafted > GAMMA * exit_layer * plain.per_layer()  # it did draft
    bound = 1.2 * exit_layer / layers * plain.total * GAMMA + STEP_SELF
    assert drafted <= bound, (kind, drafted, bound)
    token = per_token(plain, exit_layer, mode, model.config.vocab_size) + (HALTING if kind == "kangaroo" else 0)
    assert drafted <= GAMMA * token + STEP_SELF, (kind, drafted, GAMMA * token + STEP_SELF, ops.ops["draft"])
    assert ops.syncs == {}, ops.syncs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("draft_layers", [1, 2])
def test_a_draft_model_costs_its_own_plain_step_per_token(targets, draft_layers, mode):
    draft = make_tiny("llama", num_layers=draft_layers, seed=1)
    own = step_ops(draft, None, mode)
    ops = step_ops(targets[2], DraftModel(draft, num_tokens=GAMMA), mode)
    drafted = ops.by_phase()["draft"]
    assert drafted > GAMMA * draft_layers * own.per_layer()  # it did draft, γ forwards
    assert drafted <= 1.2 * GAMMA * own.total, (drafted, own.total)
    bound = GAMMA * per_token(own, draft_layers, mode, draft.config.vocab_size) + STEP_MODEL
    assert drafted <= bound, (drafted, bound, ops.ops["draft"])
    assert ops.syncs == {}, ops.syncs


def test_an_adaptive_length_runs_the_same_forwards(targets):
    """γ lives on the device and masks the chain: the adaptive schedule drafts the same static
    budget, plus its update of γ (a few ops)."""
    draft = make_tiny("llama", num_layers=1, seed=1)
    fixed = step_ops(targets[2], DraftModel(draft, num_tokens=GAMMA), "greedy").by_phase()["draft"]
    adaptive = step_ops(targets[2], DraftModel(draft, num_tokens=GAMMA, schedule="adaptive"), "greedy")
    assert fixed <= adaptive.by_phase()["draft"] <= fixed + 10
    assert adaptive.syncs == {}


@pytest.mark.parametrize("mode", MODES)
def test_drafts_through_the_kernel_path_are_the_mask_paths(monkeypatch, mode):
    """The draft forwards now attend like the target's verification: through the tree-attention
    operator, which reads each row's start and length (here its pure-torch reference, as in
    ``count_step_ops``), with constant masks for a lone token. On a ragged batch they propose
    exactly what the dense-mask path proposes: the same tokens and the same acceptance, step by
    step, greedy and (same seed) sampled; greedy equals HF. The draft model is the target itself,
    whose greedy drafts are all accepted, so a draft forward reading the wrong slots would show."""
    from tiny import hf_greedy, ragged_batch

    from specdec import runner
    from specdec.kernels import tree_attention_reference

    model = make_tiny("llama", num_layers=4)
    ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=4)
    ref = hf_greedy(model, ids, mask, max_new_tokens=16, eos_token_id=None)
    monkeypatch.setattr(runner, "tree_attention_op", tree_attention_reference)
    makers = {"layerskip": lambda: LayerSkip(exit_layer=2, num_tokens=3),
              "kangaroo": lambda: make_drafter("kangaroo", exit_layer=2, num_tokens=4, stop_threshold=0.3),
              "draft_model": lambda: DraftModel(model, num_tokens=3),
              "adaptive": lambda: DraftModel(model, num_tokens=4, schedule="adaptive")}
    for name, make in makers.items():
        runs = []
        for attention in ("reference", "triton"):
            torch.manual_seed(7)
            out = specdec.wrap(model, drafter=make(), attention=attention).generate(
                ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, eos_token_id=None,
                return_dict_in_generate=True, **MODES[mode])
            runs.append(out)
        dense, kernel = runs
        assert torch.equal(dense.sequences, kernel.sequences), name
        assert dense.spec_stats.accepted_lengths == kernel.spec_stats.accepted_lengths, name
        assert kernel.spec_stats.tau > 1.0, name  # drafts were accepted: a wrong draft path would show
        if mode == "greedy":
            assert torch.equal(kernel.sequences, ref), name
