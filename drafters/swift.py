"""Swift: a layer-skip self-draft whose skip set is searched on the fly, during generation.

After SWIFT (Xia et al., "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference
Acceleration", ICLR 2025). While generating, each step spends ``evals_per_step`` extra draft
forwards scoring candidate skip sets; everything else is an ordinary layer-skip draft with the
best set so far.

- **Score.** One parallel forward of the row's last ``window`` committed tokens through the
  candidate's layers (the prefix before the window read from the target's cache, the window's
  own K/V in scratch slots): the share of positions whose top-1 draft token is the token that
  actually came next (generated tokens only). That is the draft's greedy acceptance on recent
  output, at the cost of one forward and no verification.
- **Search.** Random skip sets of the configured size, and every ``bo_every``-th evaluation a
  Bayesian-optimisation proposal: a Gaussian process over skip masks (RBF kernel on the Hamming
  distance) fitted to the scores so far, maximising expected improvement over a pool of random
  sets and one-swap mutations of the best ones.
- **Stop** when the best score reaches ``target_score`` or after ``max_evals`` evaluations;
  the chosen set is cached per ``task`` (and in ``cache_path``, a JSON file, when given), so a
  later call on the same task drafts with it straight away.
- **Confidence-aware drafting**: a row's draft ends once the draft's top probability falls
  below ``stop_threshold`` (``LayerSkip``'s halting).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from specdec.verifiers.tree import DraftTree

from .base import DecodeContext, DraftSpec
from .layerskip import LayerSkip


class Swift(LayerSkip):
    """Example::

        drafter = Swift(skip_ratio=0.4, num_tokens=5, task="code")
        spec = specdec.wrap(model, drafter=drafter)
        spec.generate(...)                 # searches while it generates
        drafter.skip_sets["code"]          # the chosen layers to skip, reused by later calls
    """

    def __init__(self, skip_ratio: float = 0.4, num_tokens: int = 5, stop_threshold: float | None = 0.5,
                 window: int = 32, target_score: float = 0.9, max_evals: int = 64, evals_per_step: int = 1,
                 bo_every: int = 4, bo_pool: int = 256, protect_ends: bool = True, task: str = "default",
                 cache_path: str | None = None, seed: int = 0):
        if not 0.0 < skip_ratio < 1.0:
            raise ValueError(f"skip_ratio must be in (0, 1), got {skip_ratio}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if evals_per_step < 1 or max_evals < 1 or bo_every < 1:
            raise ValueError("evals_per_step, max_evals and bo_every must be >= 1")
        super().__init__(skip_layers=[], num_tokens=num_tokens, stop_threshold=stop_threshold)
        self.skip_ratio, self.window, self.target_score = skip_ratio, window, target_score
        self.max_evals, self.evals_per_step, self.bo_every, self.bo_pool = max_evals, evals_per_step, bo_every, bo_pool
        self.protect_ends, self.task = protect_ends, task
        self.cache_path = Path(cache_path) if cache_path else None
        self.rng = random.Random(seed)
        self.skip_sets: dict[str, list[int]] = {}  # task -> chosen skip set (the search is over)
        self.searches: dict[str, dict] = {}  # task -> {"scores": {skip tuple: mean score}, "evals": n}
        if self.cache_path is not None and self.cache_path.is_file():
            self.skip_sets = {k: list(v) for k, v in json.loads(self.cache_path.read_text()).items()}
        self.evals = 0  # score forwards in the current generate call
        # The search scores skip sets on the host between steps: one step per sync, eagerly. Each
        # score writes its window's K/V into scratch slots past the root.
        self.spec = DraftSpec(num_nodes=num_tokens, scratch_slots=window, device_only=False,
                              forwards_per_step=num_tokens)

    # ------------------------------------------------------------------ protocol
    def bind(self, target) -> None:
        super().bind(target)
        n = target.num_layers
        self.candidates = list(range(1, n - 1)) if self.protect_ends and n > 3 else list(range(n))
        self.n_skip = max(1, min(len(self.candidates) - 1, round(self.skip_ratio * n)))
        for task, skip in self.skip_sets.items():
            if any(not 0 <= i < n for i in skip) or len(skip) >= n:
                raise ValueError(f"cached skip set for task {task!r} does not fit this {n}-layer target: {skip}")

    def begin(self, ctx: DecodeContext) -> None:
        super().begin(ctx)
        self.evals = 0
        self.prompt_end = ctx.max_seq_len  # slots from here on hold generated tokens
        if self.task not in self.skip_sets:
            search = self.searches.setdefault(self.task, {"scores": {}, "evals": 0})
            if not search["scores"]:
                self.skip_layers = self._default_set()
        else:
            self.skip_layers = list(self.skip_sets[self.task])

    @property
    def searching(self) -> bool:
        return self.task not in self.skip_sets

    def propose(self, ctx: DecodeContext) -> DraftTree:
        if self.searching:
            for _ in range(self.evals_per_step):
                self._search_step(ctx)
                if not self.searching:
                    break
        return self.draft_chain(ctx, self.layers(), self.num_tokens)

    # ------------------------------------------------------------------ search
    def _default_set(self) -> list[int]:
        """Before any score: evenly spaced layers over the candidates (a fair first guess)."""
        c, n = self.candidates, self.n_skip
        return sorted({c[int(i * len(c) / n)] for i in range(n)})

    def _search_step(self, ctx: DecodeContext) -> None:
        search = self.searches[self.task]
        scores: dict[tuple, float] = search["scores"]
        if not scores:
            candidate = tuple(self.skip_layers)
        elif search["evals"] % self.bo_every == self.bo_every - 1 and len(scores) >= 3:
            candidate = self._bayes_proposal(scores)
        else:
            candidate = self._random_set(scores)
        score = self.score(ctx, [i for i in range(self.runner.num_layers) if i not in set(candidate)])
        if score is None:  # too little context yet
            return
        search["evals"] += 1
        self.evals += 1
        # Scores of one set on different windows are averaged: the context moves every step.
        seen = scores.get(candidate)
        scores[candidate] = score if seen is None else 0.5 * (seen + score)
        best = max(scores, key=scores.get)
        self.skip_layers = list(best)
        if scores[best] >= self.target_score or search["evals"] >= self.max_evals:
            self.skip_sets[self.task] = list(best)
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                self.cache_path.write_text(json.dumps(self.skip_sets, indent=1))

    def _random_set(self, scores: dict) -> tuple:
        for _ in range(100):
            candidate = tuple(sorted(self.rng.sample(self.candidates, self.n_skip)))
            if candidate not in scores:
                return candidate
        return candidate

    def _mutations(self, skip: tuple) -> list[tuple]:
        kept = [i for i in self.candidates if i not in skip]
        return [tuple(sorted((set(skip) - {out}) | {inn})) for out in skip for inn in kept]

    def _bayes_proposal(self, scores: dict) -> tuple:
        """Expected-improvement maximiser of a GP fitted to the scores so far."""
        sets = list(scores)
        top = sorted(sets, key=scores.get, reverse=True)[:4]
        pool = {self._random_set(scores) for _ in range(self.bo_pool // 2)}
        for s in top:
            muts = self._mutations(s)
            pool.update(self.rng.sample(muts, min(len(muts), self.bo_pool // (2 * len(top)))))
        pool -= set(sets)
        if not pool:
            return self._random_set(scores)
        pool = sorted(pool)
        x = self._encode(sets)
        y = torch.tensor([scores[s] for s in sets], dtype=torch.float64)
        mean, std = gp_posterior(x, y, self._encode(pool))
        best = y.max()
        z = (mean - best - 0.01) / std
        normal = torch.distributions.Normal(0.0, 1.0)
        ei = (mean - best - 0.01) * normal.cdf(z) + std * normal.log_prob(z).exp()
        return pool[int(ei.argmax())]

    def _encode(self, sets: list[tuple]) -> torch.Tensor:
        x = torch.zeros(len(sets), len(self.candidates), dtype=torch.float64)
        index = {layer: j for j, layer in enumerate(self.candidates)}
        for r, s in enumerate(sets):
            x[r, [index[i] for i in s]] = 1.0
        return x

    @torch.no_grad()
    def score(self, ctx: DecodeContext, layers: list[int]) -> float | None:
        """Greedy match rate of a draft through ``layers`` on each row's last ``window`` tokens.

        Inputs are the committed tokens at slots ``seq_len - 1 - w .. seq_len - 2`` (whose K/V
        the cache holds); targets are the tokens one slot later. The window's own K/V go to
        scratch slots from ``seq_len - 1`` on; each window token sees the committed prefix
        before the window and the window tokens up to itself. Only targets generated in this call
        count; returns None while there are fewer than 2.
        """
        b, dev = ctx.tokens.shape[0], ctx.tokens.device
        w = min(self.window, ctx.max_seq_len - 1)
        if w < 2:
            return None
        seq, start = ctx.seq_len, ctx.start
        ar = torch.arange(w, device=dev)
        inp = (seq - 1 - w).unsqueeze(1) + ar  # [B, W] committed slots of the inputs
        # Score only positions whose next token the target generated: prompt text is not what the
        # draft will be asked to predict (and a perfect draft would not match it either).
        real = (inp >= start.unsqueeze(1)) & (inp + 1 >= self.prompt_end)
        if int(real.sum()) < 2:
            return None
        inputs = ctx.tokens.gather(1, inp.clamp(min=0))
        targets = ctx.tokens.gather(1, inp.clamp(min=0) + 1)
        write = (seq - 1).unsqueeze(1) + ar  # [B, W] scratch slots
        view = ctx.max_seq_len - 1 + w
        j = torch.arange(view, device=dev)
        prefix = (j >= start.unsqueeze(1)) & (j < (seq - 1 - w).unsqueeze(1))  # [B, view]
        causal = torch.ones(w, w, dtype=torch.bool, device=dev).tril().expand(b, w, w)
        mask = prefix.unsqueeze(1).expand(b, w, view).clone()
        mask.scatter_(2, write.unsqueeze(1).expand(b, w, w), causal)
        out = self.runner.forward(ctx.cache, inputs, (inp - start.unsqueeze(1)).clamp(min=0), write, causal,
                                  view_len=view, layers=layers, mask=mask)
        hits = ((out.logits.argmax(dim=-1) == targets) & real).sum()
        return float(hits) / max(1, int(real.sum()))


def gp_posterior(x, y, x_new, lengthscale: float = 0.1, noise: float = 1e-2):
    """Posterior mean and std of a zero-mean GP on standardised ``y``.

    The kernel is ``exp(-hamming / (D * lengthscale))``: on 0/1 vectors the Hamming distance is
    the squared Euclidean one, so this is an RBF kernel and positive definite.

    x ``[N, D]`` and x_new ``[M, D]`` are 0/1 masks; returns ``(mean [M], std [M])`` in y's units.
    """
    mu, sd = y.mean(), y.std().clamp(min=1e-6) if len(y) > 1 else torch.tensor(1.0, dtype=y.dtype)
    yn = (y - mu) / sd
    d = x.shape[1]

    def kernel(a, b):
        ham = (a.unsqueeze(1) - b.unsqueeze(0)).abs().sum(-1) / d
        return torch.exp(-ham / lengthscale)

    k = kernel(x, x) + noise * torch.eye(len(x), dtype=x.dtype)
    chol = torch.linalg.cholesky(k)
    k_star = kernel(x, x_new)  # [N, M]
    alpha = torch.cholesky_solve(yn.unsqueeze(1), chol)
    mean = (k_star.T @ alpha).squeeze(1)
    v = torch.cholesky_solve(k_star, chol)
    var = (1.0 - (k_star * v).sum(0)).clamp(min=1e-9)
    return mu + sd * mean, sd * var.sqrt()
