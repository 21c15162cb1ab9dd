"""How well a draft matches its target on held-out prompts: α from logits, τ from the engine.

- α (Leviathan et al.) is the mean over response tokens of Σ_v min(p_v, q_v): the expected
  acceptance of one drafted token under speculative sampling at temperature 1.
- ``greedy_match`` is the share of response tokens where both argmaxes agree: the acceptance of
  greedy speculative decoding.
- τ is the engine's mean accepted length per step (accepted + bonus), measured by really running
  `specdec.wrap(target, drafter=...)` on a few prompts (`measure_tau` for a draft model,
  `engine_tau` for any drafter, e.g. the head drafters).

The held-out responses are the target's own greedy continuations, generated once.
"""
from dataclasses import dataclass

import torch

from .data import Batch, join_responses, pad_prompts
from .losses import acceptance, divergence


@dataclass
class Alignment:
    alpha: float         # mean Σ min(p, q) over response tokens
    greedy_match: float  # share of response tokens where argmax p == argmax q
    divergence: float    # mean training divergence over response tokens
    tokens: int          # response tokens measured


def response_logits(model, batch: Batch) -> torch.Tensor:
    """Logits that predict the response tokens: [B, R, V] (column j predicts token P + j)."""
    width = batch.input_ids.shape[1] - batch.prompt_len
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=width + 1, use_cache=False)
    return out.logits[:, :-1]


@torch.no_grad()
def generate_responses(model, prompts: list[list[int]], pad_id: int, eos_ids: list[int],
                       max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0) -> Batch:
    """Prompts plus ``model``'s continuations as a `Batch`; sampling uses the full distribution."""
    device = next(model.parameters()).device
    ids, mask = pad_prompts(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else \
        dict(do_sample=False)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         min_new_tokens=1, pad_token_id=pad_id, eos_token_id=eos_ids, **sampling)
    model.train(was_training)
    return join_responses(ids, mask, out[:, ids.shape[1]:], eos_ids, pad_id)


@torch.no_grad()
def measure_alignment(target, draft, batches: list[Batch], kind: str = "fkl", beta: float = 0.5,
                      temperature: float = 1.0) -> Alignment:
    """α, greedy agreement and the divergence of ``draft`` against ``target`` on ``batches``."""
    was_training = draft.training
    draft.eval()
    alpha = match = div = 0.0
    tokens = 0
    device = next(draft.parameters()).device
    for batch in batches:
        batch = batch.to(device)
        keep = batch.response_mask.bool()                      # [B, R]
        p_logits = response_logits(target, batch)[keep]        # [N, V]
        q_logits = response_logits(draft, batch)[keep]         # [N, V]
        alpha += acceptance(p_logits, q_logits, temperature).sum().item()
        match += (p_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
        div += divergence(p_logits, q_logits, kind, beta, temperature).sum().item()
        tokens += int(keep.sum())
    draft.train(was_training)
    tokens_or_one = max(tokens, 1)
    return Alignment(alpha / tokens_or_one, match / tokens_or_one, div / tokens_or_one, tokens)


@dataclass
class EngineRun:
    tau: float              # mean accepted length per step (accepted + bonus), averaged over prompts
    acceptance_rate: float  # accepted draft tokens / proposed draft tokens, averaged over prompts


@torch.no_grad()
def measure_tau(target, draft, prompts: list[list[int]], num_tokens: int, max_new_tokens: int) -> EngineRun:
    """Greedy speculative decoding of ``prompts``, one at a time, through the engine."""
    from specdec.drafters import DraftModel

    was_training = draft.training
    draft.eval()
    run = engine_tau(target, DraftModel(draft, num_tokens=num_tokens), prompts, max_new_tokens)
    draft.train(was_training)
    return run


@torch.no_grad()
def engine_tau(target, drafter, prompts: list[list[int]], max_new_tokens: int) -> EngineRun:
    """Greedy speculative decoding of ``prompts`` with ``drafter``, one at a time, through the engine."""
    from specdec import wrap

    spec = wrap(target, drafter=drafter)
    device = next(target.parameters()).device
    taus, rates = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = spec.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, return_dict_in_generate=True)
        taus.append(float(out.spec_stats.tau))
        rates.append(float(out.spec_stats.acceptance_rate))
    return EngineRun(sum(taus) / len(taus), sum(rates) / len(rates))
