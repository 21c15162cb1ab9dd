"""Kangaroo: an early exit of the target plus a one-block adapter, drafting a chain that halts when unsure.

After Liu et al., "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting" (2024).
The draft is the target's own first ℓ layers (shared weights and shared K/V, as in `LayerSkip`),
then a small trained *adapter*, then the target's LM head:

    token -> target layers 0 .. ℓ-1 -> exit state e -> adapter -> norm -> target LM head -> logits

The adapter (`KangarooAdapterModel`) is one attention block without an MLP: an input norm, the
target architecture's own attention module over the adapter's past, a residual add, and an output
norm (started as a copy of the target's final norm). Its ``o_proj`` starts at zero, so an
untrained adapter drafts exactly what the plain early exit after ℓ layers drafts.

Drafting (`KangarooAdapter`). A step feeds the root, then each drafted token but the last, through
the first ℓ layers (their K/V go to the target cache's scratch slots, which verification
overwrites) and the adapter (its K/V go to its own cache, slot for slot like the target's). With
``stop_threshold`` a row's chain ends at the first token whose draft probability is below it
(Kangaroo's second early exit): later nodes are masked on the device, shapes stay static.

Reuse of the exited states. Verification already runs the first ℓ layers over the root and every
node, so the drafter asks for the target's states after layer ℓ (``hidden_layers = (ℓ,)``) and, in
``observe``, feeds those at the accepted path into the adapter. The prompt's are handed over the
same way by the target's own prefill (``DraftSpec.prefill_hidden``, ``observe_prefill``, inside the
captured prefill on CUDA), so ``begin`` runs nothing. The first ℓ layers are never re-run over
verified tokens; only each step's new root (the bonus token) goes through them in ``propose``.
(Verification itself still runs all layers over the draft tokens; letting it start at layer ℓ
from the draft's exit states would need the engine's verify step to take them.)

Checkpoints: a speculators-style folder (``config.json`` with ``speculators_model_type:
"kangaroo"``, ``exit_layer`` and ``transformer_layer_config``; ``model.safetensors`` with
``layers.0.input_layernorm.*``, ``layers.0.self_attn.*`` and ``norm.weight``). The LM head is the
target's and is not stored.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from specdec.cache import KVCache
from specdec.verifiers.acceptance import StepOutcome, sample, warp_probs
from specdec.verifiers.tree import DraftTree

from .base import DecodeState, DraftSpec, Drafter
from .draw import process_chain
from .head_common import CHUNK, cast, check_fits, target_states
from .head_layer import AdapterStep, additive_mask
from .heads import (cache_kwargs, _config_dict, _config_from_dict, _in_dtype, _load_checked, _proposal, _read_folder,
                    _write_folder, arch_classes, causal_mask, layer_config, resolve_folder)


class AdapterBlock(nn.Module):
    """The adapter's one block: ``x + attn(input_layernorm(x))``, the target architecture's attention."""

    def __init__(self, config, classes: dict):
        super().__init__()
        layer = classes["layer"](config, layer_idx=0)
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn  # the decoder layer's MLP and second norm are dropped


class KangarooAdapterModel(nn.Module):
    """Kangaroo's adapter over the target's states after ``exit_layer`` layers.

    Args:
        config: the target's config cut to one layer (`specdec.drafters.heads.layer_config`).
        exit_layer: ℓ, the number of target layers the draft runs before the adapter.
        verifier: {"name_or_path", "architectures"} of the target, recorded in config.json.

    Tensors (checkpoint names): ``layers.0.input_layernorm.weight`` [H], ``layers.0.self_attn.*``
    (q/k/v/o projections, plus biases or q/k norms where the architecture has them),
    ``norm.weight`` [H].
    """

    def __init__(self, config, exit_layer: int, verifier: dict | None = None):
        super().__init__()
        if exit_layer < 1:
            raise ValueError(f"exit_layer must be >= 1, got {exit_layer}")
        classes = arch_classes(config)
        self.config, self.exit_layer, self.verifier = config, int(exit_layer), verifier or {}
        self.layers = nn.ModuleList([AdapterBlock(config, classes)])
        self.norm = classes["norm"](config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = classes["rotary"](config=config)

    @classmethod
    def from_target(cls, target, exit_layer: int) -> "KangarooAdapterModel":
        """A new adapter for ``target`` (fp32, on its device): output norm copied from the target's
        final norm, ``o_proj`` zero (so it starts as the plain early exit).

        Example:
            >>> adapter = KangarooAdapterModel.from_target(smollm2, exit_layer=6)
            >>> normed = adapter(exit_states, positions)          # [B, Q, 576]; logits: smollm2.lm_head(normed)
        """
        num_layers = target.config.num_hidden_layers
        if not 1 <= exit_layer < num_layers:
            raise ValueError(f"exit_layer must be in 1..{num_layers - 1} for this {num_layers}-layer target, "
                             f"got {exit_layer}")
        verifier = {"name_or_path": target.config.name_or_path or None,
                    "architectures": list(target.config.architectures or [type(target).__name__])}
        adapter = cls(layer_config(target.config), exit_layer, verifier)
        with torch.no_grad():
            adapter.norm.weight.copy_(target.base_model.norm.weight)
            nn.init.zeros_(adapter.layers[0].self_attn.o_proj.weight)
        return adapter.to(device=target.get_output_embeddings().weight.device, dtype=torch.float32)

    def forward(self, hidden: Tensor, positions: Tensor, cache=None, mask: Tensor | None = None) -> Tensor:
        """[B, Q, H] exit states (the target's output of layer ℓ) -> [B, Q, H] normed states that
        the target's LM head turns into next-token logits.

        positions: [B, Q] position ids (rotary embedding). cache: an HF-style ``update(k, v,
        layer_idx)`` object (`specdec.drafters.heads.HeadCache`, or a one-layer `KVCache` with
        ``write_slots`` set). mask: [B, 1, Q, S] bool, True where a query may attend; None: causal
        over the new tokens (and a `HeadCache`'s past).
        """
        if mask is None:
            b, q = hidden.shape[:2]
            mask = causal_mask(b, q, getattr(cache, "length", 0) if cache is not None else 0, hidden.device)
        block = self.layers[0]
        rope = self.rotary_emb(hidden, positions)                                             # cos, sin [B, Q, D]
        attn, _ = block.self_attn(hidden_states=block.input_layernorm(hidden), position_embeddings=rope,
                                  attention_mask=mask, **cache_kwargs(block.self_attn, cache))
        return self.norm(hidden + attn)

    # ---- checkpoints ------------------------------------------------------------------------
    def speculators_config(self, speculative_tokens: int = 6) -> dict:
        """config.json: the speculators fields, with ``speculators_model_type: kangaroo``."""
        return {"architectures": ["KangarooSpeculator"], "speculators_model_type": "kangaroo",
                "transformer_layer_config": _config_dict(self.config), "exit_layer": self.exit_layer,
                "target_hidden_size": self.config.hidden_size, "draft_vocab_size": self.config.vocab_size,
                "speculators_config": _proposal("kangaroo", speculative_tokens, self.verifier)}

    def save_pretrained(self, folder, speculative_tokens: int = 6, dtype: torch.dtype | None = None):
        """Write config.json and model.safetensors (in ``dtype``, e.g. torch.bfloat16, if given)."""
        return _write_folder(folder, self.speculators_config(speculative_tokens), _in_dtype(self.state_dict(), dtype))

    @classmethod
    def from_pretrained(cls, folder, device=None) -> "KangarooAdapterModel":
        """Load a `save_pretrained` folder or a shipped ``zoo:<head>`` name (fp32); names, shapes
        and dtypes are checked."""
        folder = resolve_folder(folder, "kangaroo")
        config, tensors = _read_folder(folder, "kangaroo")
        adapter = cls(_config_from_dict(config["transformer_layer_config"], folder), config["exit_layer"],
                      config.get("speculators_config", {}).get("verifier"))
        _load_checked(adapter, tensors, folder)
        return adapter.to(device) if device is not None else adapter


class KangarooAdapter(Drafter):
    """Kangaroo drafting with a trained adapter (`KangarooAdapterModel`): a chain of up to ``num_tokens``.

    Example::

        adapter = KangarooAdapterModel.from_pretrained("runs/kangaroo/head")
        spec = specdec.wrap(target, drafter=KangarooAdapter(adapter, num_tokens=6, stop_threshold=0.6))

    Every step runs ``num_tokens`` forwards of the first ℓ layers and the adapter (the last drafted
    token is not fed). ``stop_threshold`` (None: never halt) masks a row's chain from the first
    token whose draft probability is below it. With sampling each token is drawn from the warped
    draft distribution and ``q`` carries it.
    """

    def __init__(self, adapter: KangarooAdapterModel, num_tokens: int = 6, stop_threshold: float | None = None):
        if not isinstance(adapter, KangarooAdapterModel):
            raise TypeError(f"KangarooAdapter needs a KangarooAdapterModel, got {type(adapter).__name__}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if stop_threshold is not None and not 0.0 <= stop_threshold < 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1), got {stop_threshold}")
        self.adapter, self.num_tokens, self.stop_threshold = adapter.eval(), num_tokens, stop_threshold
        self.exit_layer = adapter.exit_layer
        self.spec = DraftSpec(num_nodes=num_tokens, hidden_layers=(self.exit_layer,), forwards_per_step=num_tokens,
                              prefill_hidden=True)
        self.runner = None
        self.cache: KVCache | None = None  # the adapter's own K/V by slot, laid out like the target's cache
        self._exit = None                  # the target runner's forward (compiled by compile())
        self.step = AdapterStep(self.adapter)
        self._adapt = self.step.forward
        self._arange: Tensor | None = None  # [capacity] 0, 1, ...: slot offsets, made once per cache
        self._one: Tensor | None = None     # [B, 1, 1] True: a fed token sees itself among the new ones

    @classmethod
    def from_pretrained(cls, folder, num_tokens: int = 6, stop_threshold: float | None = None, device=None,
                        dtype: torch.dtype | str | None = None) -> "KangarooAdapter":
        """Load a speculators folder (`KangarooAdapterModel.save_pretrained`) or a shipped adapter by
        zoo name, e.g. ``"zoo:smollm2-135m-instruct-kangaroo"``; ``dtype`` casts the adapter."""
        return cls(cast(KangarooAdapterModel.from_pretrained(folder, device=device), dtype), num_tokens=num_tokens,
                   stop_threshold=stop_threshold)

    def compile(self, options: dict | None) -> None:
        from specdec.step import compiled

        self._exit = compiled(self.runner.forward, options or True)
        self._adapt = compiled(self.step.forward, options or True)

    def bind(self, target) -> None:
        """Check the adapter fits ``target``: hidden size, vocabulary, exit layer, device."""
        cfg, n = self.adapter.config, target.num_layers
        check_fits("KangarooAdapter", cfg.hidden_size, cfg.vocab_size, self.adapter.norm.weight.device, target,
                    self.adapter.verifier)
        if not 1 <= self.exit_layer < n:
            raise ValueError(f"KangarooAdapter: exit layer {self.exit_layer} is outside this {n}-layer target's "
                             f"1..{n - 1}; the adapter was trained for another target")
        if self.runner is not target:
            self._exit = target.forward
        self.runner = target

    # ------------------------------------------------------------------ adapter steps
    def _adapter_kv(self, state: DecodeState, exits: Tensor, slots: Tensor, view: int, eager: bool = False) -> None:
        """Write the adapter's K/V for exit states ``exits`` [B, Q, H] at ``slots`` [B, Q]: the
        entries later queries read (nothing else of the adapter is computed). ``eager``: skip the
        compiled adapter (the host-side catch-up, whose shapes follow the prompt length)."""
        self.cache.write_slots, self.cache.view_len = slots, view
        rope = self.step.rope((slots - state.start[:, None]).clamp(min=0))
        (self.step.forward if eager else self._adapt)(exits, rope, None, self.cache, kv_only=True)

    def logits(self, normed: Tensor) -> Tensor:
        """[B, Q, H] adapter outputs -> [B, Q, V] fp32 logits through the target's LM head."""
        return self.runner.lm_head(normed.to(self.runner.dtype)).float()

    def _exit_state(self, state: DecodeState, tokens: Tensor, slot: Tensor, position: Tensor, offset: int) -> Tensor:
        """Feed ``tokens`` [B] at ``slot`` [B, 1] (``seq_len - 1 + offset``, at ``position``) through
        the first ℓ target layers (K/V to scratch slots): the exit states [B, 1, H]. Reads the
        committed prefix and the tokens fed so far this step; the caller restores ``cache.lengths``."""
        cache = state.cache
        cache.lengths.copy_(slot.squeeze(1))
        out = self._exit(cache, tokens.unsqueeze(1), position, slot, self._one, view_len=state.max_seq_len + offset,
                         layers=range(self.exit_layer), compute_logits=False, return_hidden=True, contiguous=True)
        return out.hidden

    def _catch_up(self, state: DecodeState, lo: int) -> None:
        """Adapter entries of committed slots ``lo .. seq_len - 2`` from the target's exit states
        there (`target_states`, which leaves the committed cache alone). Host-side."""
        hi, b, dev = int(state.seq_len.max()), state.tokens.shape[0], state.tokens.device
        room = min(CHUNK, state.capacity - hi + 1)
        for a in range(lo, hi - 1, room):
            z = min(a + room, hi - 1)
            slots = torch.arange(a, z, device=dev).expand(b, z - a)
            exits = target_states(state, slots, (self.exit_layer,))[0]                  # [B, Q, H]
            self._adapter_kv(state, exits, slots, z, eager=True)

    # ------------------------------------------------------------------ protocol
    def reserve(self, state: DecodeState) -> None:
        """The adapter cache for ``state``'s batch and capacity (kept while it fits), the fused
        adapter weights (`AdapterStep.refresh`) and the rows' first real slots: all that
        ``observe_prefill`` writes through, set before the prefill."""
        if self.runner is not state.target:
            self.bind(state.target)
        b, cap = state.tokens.shape
        if self.cache is None or self.cache.batch != b or self.cache.max_len < cap:
            self.cache = KVCache.for_model(self.adapter.config, b, cap, self.adapter.norm.weight.dtype,
                                           state.tokens.device)
            self._arange = torch.arange(cap, device=state.tokens.device)
            self._one = torch.ones(b, 1, 1, dtype=torch.bool, device=state.tokens.device)
        self.step.refresh()
        self.cache.start.copy_(state.start)

    @torch.no_grad()
    def observe_prefill(self, state: DecodeState, slots: Tensor, layer_hidden: Tensor) -> None:
        """The adapter's K/V over a prefill chunk, from the target's own exit states there
        (``layer_hidden[0]`` [B, C, H]): the prompt never goes through the first ℓ layers twice.
        Slots past the prompt get entries that ``propose`` and ``observe`` overwrite before any
        query reads them; left padding is never attended."""
        self._adapter_kv(state, layer_hidden[0], slots, self.cache.max_len, eager=True)

    def begin(self, state: DecodeState) -> None:
        """The adapter cache over the prompt: written by the prefill (``observe_prefill``), or,
        when the prefill did not hand the states over (``state.prompt_states`` false), by one
        forward of the first ℓ target layers over the prompt against the committed cache."""
        self.reserve(state)
        if not state.prompt_states:
            self._catch_up(state, 0)

    def resync(self, state: DecodeState, since: int) -> None:
        """After undrafted steps (from committed length ``since`` on): the entries they skipped."""
        self._catch_up(state, max(since - 2, 0))

    @torch.no_grad()  # whatever the caller's grad mode (step_profile's was on): no autograd, no grad on buffers
    def propose(self, state: DecodeState) -> DraftTree:
        k, start = self.num_tokens, state.start[:, None]
        view = state.max_seq_len + k  # committed adapter entries plus the chain's slots
        slots = (state.seq_len - 1).unsqueeze(1) + self._arange[:k]                        # [B, K] root, then the chain
        positions = slots - start
        j, s = self._arange[:view], slots.unsqueeze(-1)
        mask = additive_mask((j >= start[:, :, None]) & (j <= s) | (j == s))               # [B, 1, K, view]
        rope = self.step.rope(positions)
        current = state.tokens.gather(1, slots[:, :1]).squeeze(1)                          # [B] the root
        tokens, valid, dists, alive = [], [], [], None
        try:
            for i in range(k):
                exits = self._exit_state(state, current, slots[:, i:i + 1], positions[:, i:i + 1], i)  # [B, 1, H]
                self.cache.write_slots, self.cache.view_len = slots[:, i:i + 1], view
                normed = self._adapt(exits, (rope[0][:, i:i + 1], rope[1][:, i:i + 1]), mask[:, :, i:i + 1], self.cache)
                logits = process_chain(state, self.logits(normed)[:, -1], tokens)           # [B, V]
                probs = warp_probs(logits, state.params) if state.params.do_sample else None
                current = logits.argmax(dim=-1) if probs is None else sample(probs)
                if self.stop_threshold is not None:  # Kangaroo's halting, by masking: no host check
                    top = (logits.softmax(dim=-1) if probs is None else probs).max(dim=-1).values
                    alive = top >= self.stop_threshold if alive is None else alive & (top >= self.stop_threshold)
                    valid.append(alive)
                tokens.append(current)
                dists.append(probs)
        finally:
            state.cache.lengths.copy_(state.seq_len - 1)
        q = torch.stack(dists, dim=1) if state.params.do_sample else None                  # [B, K, V]
        return DraftTree.chain(torch.stack(tokens, dim=1), torch.stack(valid, dim=1) if valid else None, q=q)

    @torch.no_grad()
    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Feed the target's exit states at the old root and the accepted nodes (from verification)
        into the adapter at their slots. Entries past the accepted path land on slots from the new
        root on, which the next ``propose`` overwrites before reading."""
        b, n = outcome.path.shape
        root = state.seq_len - 1 - (outcome.accept_len + 1) * state.active                # [B] old root slot
        slots = root.unsqueeze(1) + self._arange[:n + 1]                                 # [B, N + 1]
        pick = torch.nn.functional.pad(outcome.path.clamp(min=0) + 1, (1, 0))            # [B, N + 1], 0 the root
        hid = state.hidden[0]                                                            # [B, N + 1, H]
        exits = hid.gather(1, pick.unsqueeze(-1).expand(b, n + 1, hid.shape[-1]))
        self._adapter_kv(state, exits, slots, state.max_seq_len + n)
