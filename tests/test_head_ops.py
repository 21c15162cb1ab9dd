"""The draft heads' draft phase stays cheap in kernels (issue 16): aten ops per step, by drafter.

On a launch-bound GPU a step costs about one launch per op, so the draft phase's op count
(``specdec.perf.count_step_ops``: propose and observe) is what a head pays per step. Invariants:

- each head drafter's draft phase, greedy and sampled, stays within its budget (what it issues
  today plus a small margin), so an op added per drafted token fails here;
- the EAGLE chain spends at most ``PER_TOKEN`` ops per drafted token;
- the draft phase does not grow with the target's depth, except for the target layers the
  Kangaroo adapter's early exit really runs (ℓ of them per drafted token);
- the written-out head layers (`specdec.drafters.head_layer`) compute what the head models'
  own forwards compute, on every tiny architecture, and follow the weights when they change.
"""
import pytest
import torch
from tiny import ARCHS, make_tiny

import specdec
from specdec.cache import KVCache
from specdec.drafters import EagleHead, KangarooAdapter, MedusaHeads
from specdec.drafters.head_layer import AdapterStep, EagleStep, additive_mask
from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel
from specdec.perf import count_step_ops

PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
SAMPLED = dict(do_sample=True, temperature=0.7, top_p=0.9)
# Draft-phase ops on the 2-layer tiny llama, (greedy, sampled). Measured after issue 16: EAGLE chain of
# 4: 173 / 218 (was 310 / 359); EAGLE tree (top-4, depth 5, 24 nodes): 296 / 384 (was 520 / 608);
# Medusa, 4 heads: 27 / 27 (was 41 / 41); Kangaroo adapter, chain of 6: 475 / 542 (was 689 / 756).
BUDGET = {"eagle4": (180, 226), "eagle_tree": (305, 395), "medusa4": (29, 29), "kangaroo6": (490, 560)}
PER_TOKEN = 45  # the EAGLE chain's draft ops per drafted token (greedy)


def head_drafters(model) -> dict:
    aux = (0, model.config.num_hidden_layers // 2, model.config.num_hidden_layers - 1)
    return {"eagle4": lambda: EagleHead(EagleHeadModel.from_target(model, aux), num_tokens=4),
            "eagle_tree": lambda: EagleHead(EagleHeadModel.from_target(model, aux), num_tokens=5, tree_topk=4,
                                            tree_depth=5, tree_nodes=24),
            "medusa4": lambda: MedusaHeads(MedusaHeadsModel.from_target(model, num_heads=4)),
            "kangaroo6": lambda: KangarooAdapter(KangarooAdapterModel.from_target(model, 1), num_tokens=6)}


def draft_ops(model, drafter, sample: bool):
    spec = specdec.wrap(model, drafter=drafter)
    kw = SAMPLED if sample else dict(do_sample=False)
    torch.manual_seed(0)
    spec.generate(PROMPT, max_new_tokens=8, pad_token_id=0, eos_token_id=None, **kw)
    return count_step_ops(spec.engine._decoder)


@pytest.fixture(scope="module")
def counts():
    """(drafter, sampled) -> StepOps of one step on the 2-layer tiny llama."""
    model = make_tiny("llama", num_layers=2)
    return {(name, sample): draft_ops(model, make(), sample)
            for name, make in head_drafters(model).items() for sample in (False, True)}


@pytest.mark.parametrize("name", list(BUDGET))
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_draft_phase_within_budget(counts, name, sample):
    ops = counts[name, sample]
    draft = ops.by_phase()["draft"]
    assert draft <= BUDGET[name][sample], (name, sample, draft, ops.ops["draft"].most_common())
    assert draft > 0


def test_eagle_chain_ops_per_drafted_token(counts):
    assert counts["eagle4", False].by_phase()["draft"] <= 4 * PER_TOKEN


@pytest.mark.parametrize("name", ["eagle4", "medusa4", "kangaroo6"])
def test_head_drafts_never_wait_for_the_host(counts, name):
    for sample in (False, True):
        assert counts[name, sample].syncs == {}, (name, sample, counts[name, sample].syncs)


def test_draft_ops_do_not_grow_with_the_target_but_for_the_exit_layers():
    """Heads on a 2- and a 4-layer target issue the same draft ops; the adapter's early exit after
    ℓ = 1 and ℓ = 2 layers differs by exactly one target layer per fed token, and nothing else."""
    drafts = {}
    for layers in (2, 4):
        model = make_tiny("llama", num_layers=layers)
        made = head_drafters(model)
        for name in ("eagle4", "eagle_tree", "medusa4"):
            drafts[name, layers] = draft_ops(model, made[name](), False).by_phase()["draft"]
    for name in ("eagle4", "eagle_tree", "medusa4"):
        assert drafts[name, 2] == drafts[name, 4], (name, drafts[name, 2], drafts[name, 4])
    model = make_tiny("llama", num_layers=4)
    exits = {}
    for exit_layer in (1, 2):
        drafter = KangarooAdapter(KangarooAdapterModel.from_target(model, exit_layer), num_tokens=6)
        exits[exit_layer] = draft_ops(model, drafter, False)
    per_layer = exits[1].per_layer()  # one target layer's ops (layers, K/V write, attention)
    extra = exits[2].by_phase()["draft"] - exits[1].by_phase()["draft"]
    assert extra == 6 * per_layer, (extra, per_layer)


def _noisy(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _cache_and_mask(config, b, past, q):
    """A head cache whose first ``past`` slots hold random K/V, and a causal mask for ``q`` new slots."""
    cache = KVCache.for_model(config, b, past + q, torch.float32, "cpu")
    for t in cache.k + cache.v:
        t.normal_()
    cache.write_slots, cache.view_len = past + torch.arange(q).expand(b, q), past + q
    j = torch.arange(past + q)
    allowed = (j <= past + torch.arange(q)[:, None]).expand(b, q, past + q)
    return cache, allowed


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_eagle_step_is_the_head_forward(arch):
    """EagleStep (fused projections, shared norms, rope table, normed-embedding table) gives the
    head model's logits and output state, and follows its weights after a change and ``refresh``."""
    torch.manual_seed(0)
    model = make_tiny(arch)
    head = _noisy(EagleHeadModel.from_target(model, (0, 1, 1)))
    step = EagleStep(head)
    b, q, past = 2, 3, 5
    tokens, feats = torch.randint(0, 256, (b, q)), torch.randn(b, q, 64)
    positions = past + torch.arange(q).expand(b, q)
    for changed in (False, True):
        if changed:
            head.layers[0].self_attn.q_proj.weight.mul_(1.5)
            head.layers[0].input_layernorm.weight.add_(0.1)
        step.refresh()
        cache, allowed = _cache_and_mask(head.config, b, past, q)
        ref_cache, _ = _cache_and_mask(head.config, b, past, q)
        for a, z in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
            z.copy_(a)
        out = step.forward(tokens, step.carry(feats), step.rope(positions), additive_mask(allowed), cache)
        ref = head(tokens, feats, positions, cache=ref_cache, mask=allowed.unsqueeze(1))
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.carry[:, :, 0], ref.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.carry[:, :, 1], head.layers[0].hidden_norm(out.carry[:, :, 0]))
        torch.testing.assert_close(cache.k[0], ref_cache.k[0], atol=1e-5, rtol=1e-5)
        last = step.forward(tokens, step.carry(feats), step.rope(positions), additive_mask(allowed), cache,
                            last_only=True, carry_out=False)
        torch.testing.assert_close(last.logits, ref.logits[:, -1:], atol=1e-5, rtol=1e-5)
        assert last.carry is None


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_adapter_step_is_the_adapter_forward(arch):
    torch.manual_seed(0)
    model = make_tiny(arch)
    adapter = _noisy(KangarooAdapterModel.from_target(model, 1))
    step = AdapterStep(adapter)
    step.refresh()
    b, q, past = 2, 3, 4
    exits, positions = torch.randn(b, q, 64), past + torch.arange(q).expand(b, q)
    cache, allowed = _cache_and_mask(adapter.config, b, past, q)
    ref_cache, _ = _cache_and_mask(adapter.config, b, past, q)
    for a, z in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        z.copy_(a)
    out = step.forward(exits, step.rope(positions), additive_mask(allowed), cache)
    ref = adapter(exits, positions, cache=ref_cache, mask=allowed.unsqueeze(1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[0], ref_cache.v[0], atol=1e-5, rtol=1e-5)
    assert step.forward(exits, step.rope(positions), None, cache, kv_only=True) is None


@pytest.mark.parametrize("name", list(BUDGET))
def test_drafting_under_grad_mode_keeps_buffers_out_of_autograd(name):
    """``engine.step_profile`` ran its phases with autograd on: a head's K/V write then made its
    cache buffers require grad, so the captured replay's compiled forward saw other inputs than
    its warm-up had and recompiled inside the CUDA-graph capture, which fails. However a step is
    called, head drafting records no autograd and leaves its buffers as they were."""
    model = make_tiny("llama", num_layers=2)
    drafter = head_drafters(model)[name]()
    spec = specdec.wrap(model, drafter=drafter)
    spec.generate(PROMPT, max_new_tokens=4, pad_token_id=0, eos_token_id=None, do_sample=False)
    dec = spec.engine._decoder
    with torch.enable_grad():
        dec.step(0, dec.view_for(dec.state.max_seq_len), True)
    buffers = [getattr(drafter, "feature", None), getattr(drafter, "last", None)]
    buffers += list(drafter.cache.k + drafter.cache.v) if getattr(drafter, "cache", None) is not None else []
    assert [t for t in buffers if t is not None and t.requires_grad] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["chain", "tree", "kangaroo"])
def test_step_profile_of_compiled_heads_on_cuda(kind):
    """``step_profile`` captures each phase of a compiled head's step on its own and replays it."""
    from tiny import hf_greedy

    model = make_tiny("llama", vocab_size=64, init_range=1.0).cuda()
    ids = (PROMPT % 60 + 4).cuda()
    head = EagleHeadModel.from_target(model, (0, 1, 1))
    drafter = {"chain": lambda: EagleHead(head, num_tokens=4),
               "tree": lambda: EagleHead(head, tree_topk=2, tree_depth=3, tree_nodes=5),
               "kangaroo": lambda: KangarooAdapter(KangarooAdapterModel.from_target(model, 1), num_tokens=3)}[kind]()
    spec = specdec.wrap(model, drafter=drafter, cuda_graphs=True, compile=True)
    out = spec.generate(ids, max_new_tokens=24, pad_token_id=0, eos_token_id=None, do_sample=False)
    assert torch.equal(out, hf_greedy(model, ids, max_new_tokens=24, eos_token_id=None))
    phases = spec.engine.step_profile(reps=3)
    assert set(phases) == {"draft", "verify", "accept", "commit"} and phases["draft"] > 0


@pytest.mark.parametrize("layers, shared", [(1, False), (2, False), (3, True)])
@torch.no_grad()
def test_batched_medusa_heads_are_the_heads(layers, shared):
    """MedusaHeads.logits (every head's residual layer in one matmul) gives ``heads(x)``, and
    follows the weights after they change and ``begin`` rebuilds the stacked copies."""
    model = make_tiny("llama")
    heads = _noisy(MedusaHeadsModel.from_target(model, num_heads=3, num_layers=layers, shared_lm_head=shared))
    drafter = MedusaHeads(heads)
    drafter.bind(specdec.wrap(model, drafter=drafter).engine.runner)
    x = torch.randn(4, 64)
    for changed in (False, True):
        if changed:
            heads.blocks[1].layers[-1].weight.mul_(2.0)
        drafter._refresh()
        torch.testing.assert_close(drafter.logits(x), heads(x.unsqueeze(1))[:, :, 0].transpose(0, 1),
                                   atol=1e-5, rtol=1e-5)
