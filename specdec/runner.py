"""ModelRunner: drives an HF decoder's own modules over the engine's KV cache.

It calls the embedding, each decoder layer's own modules (norms, projections, q/k norms, MLP),
the final norm and the LM head in order, never the model's or a layer's ``forward``. That lets
one forward pass:

- take explicit positions and an arbitrary per-row visibility mask (tree attention);
- stop at any layer or skip any set of layers (self-drafting, early exit);
- return hidden states.

HF's own code still does rotary embeddings (the architecture's ``apply_rotary_pos_emb``), q/k
norms and projections; the attention is ours (the tree kernel or the masked reference), called
directly. Nothing here touches the model's config, so HF's own forward, in any thread, sees
exactly what it saw before (``specdec.fused.run_layer``).

The runner knows models and masks. It does not know trees, drafters or acceptance.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import Tensor

from specdec.cache import KVCache
from specdec.fused import FusedLayers, run_layer, unfusable
from specdec.kernels import (block_table_attention_op, block_table_reference, masked_attention_reference,
                             tree_attention_op)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
# "auto": the Triton tree-attention kernel for verification steps on CUDA, the torch reference
# elsewhere; "reference" and "triton" force one (triton on CPU needs TRITON_INTERPRET=1).
ATTENTION_BACKENDS = ("auto", "reference", "triton")


def _specdec_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, specdec_tree=None,
                       **kwargs):
    """The attention of every layer the runner drives (same signature as HF's attention functions).

    ``attention_mask`` is our dense ``[B, Q, S]`` boolean mask (the reference path). When the
    runner passes ``specdec_tree = (start, lengths, tree_mask)`` the Triton tree-attention kernel
    reads the prefix range and the ``[B, Q, Q]`` mask among the new tokens instead.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(specdec_tree, TableView):
        attend = block_table_attention_op if specdec_tree.kernel else block_table_reference
        out = attend(query, key, value, *specdec_tree[:5], scale)
    elif specdec_tree is not None:
        out = tree_attention_op(query, key, value, *specdec_tree, scale)
    else:
        out = masked_attention_reference(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None



class TableView(NamedTuple):
    """What a forward over a block table (``forward(table=...)``) hands every layer's attention:
    the prefix is the slots ``table[b, first[b]:last[b]]``, the new tokens sit at ``new_start ..``
    under ``among`` (``kernels.block_table``); ``kernel``: the Triton kernel, else the reference."""
    table: Tensor  # [B, T] cache slots
    first: Tensor  # [B]
    last: Tensor  # [B]
    new_start: Tensor  # [B] slot of each row's first new token
    among: Tensor  # [B, Q, Q] bool
    kernel: bool


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the runner can drive."""


@dataclass
class RunnerOutput:
    logits: Tensor | None  # [B, Q', V] (Q' = Q, or the number of positions asked for)
    hidden: Tensor | None  # [B, Q, H] output of the last layer run, before the final norm
    layer_hidden: Tensor | None = None  # [E, B, Q, H] after each of ``collect``'s layer counts


class ModelRunner:
    """Runs a Llama-family ``*ForCausalLM`` layer by layer.

    Example::

        runner = ModelRunner(model)
        cache = runner.new_cache(batch=2, max_len=128)
        out = runner.forward(cache, tokens, positions, slots, among, view_len=64)
    """

    def __init__(self, model, attention: str = "auto", fuse: bool | None = False):
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        config = getattr(model, "config", None)
        arch = getattr(config, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"specdec cannot drive model_type={arch!r} ({type(model).__name__}); supported decoder "
                f"architectures are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        base = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        missing = [n for n in needed if not hasattr(base, n)]
        if missing or model.get_output_embeddings() is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} lacks the expected decoder modules ({', '.join(missing) or 'lm_head'}); "
                "pass a *ForCausalLM model of a supported architecture"
            )
        self.model = model
        self.config = config
        self.base = base
        self.layers = list(base.layers)
        self.lm_head = model.get_output_embeddings()
        self.num_layers = len(self.layers)
        self.windows = [self._window(layer) for layer in self.layers]
        self.rotary = [importlib.import_module(type(layer.self_attn).__module__).apply_rotary_pos_emb
                       for layer in self.layers]
        self.attention = attention
        # Merge the q/k/v and gate/up projections of every layer (specdec.fused): fewer kernel
        # launches per step; HF's modules keep working on views of the merged weights.
        # fuse=None: fuse when every projection is a plain Linear (not a LoRA or quantised layer).
        self.fused = None
        if fuse is None:
            fuse = unfusable(self.layers) is None
        if fuse:  # one fused copy per model, shared by every runner (and wrap) over it
            self.fused = getattr(model, "_specdec_fused", None)
            if self.fused is None or not self.fused.current(self.layers):
                self.fused = FusedLayers(self.layers)
                model.__dict__["_specdec_fused"] = self.fused

    def _window(self, layer) -> int | None:
        """Sliding-window size of one layer, or None for full attention."""
        attn = layer.self_attn
        if hasattr(attn, "sliding_window"):  # qwen2 / qwen3: set per layer type
            return attn.sliding_window
        if self.config.model_type == "mistral":
            return getattr(self.config, "sliding_window", None)
        return None

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.for_model(self.config, batch, max_len, self.dtype, self.device)

    @torch.no_grad()
    def forward(self, cache: KVCache, tokens: Tensor, positions: Tensor, slots: Tensor, among: Tensor, *,
                view_len: int, layers: Iterable[int] | None = None, logits_at: Tensor | None = None,
                compute_logits: bool = True, return_hidden: bool = False, mask: Tensor | None = None,
                contiguous: bool = False, collect: Iterable[int] | None = None,
                tree_mask: Tensor | None = None,
                table: tuple[Tensor, Tensor, Tensor] | None = None) -> RunnerOutput:
        """One pass over Q new tokens per row.

        tokens, positions, slots: ``[B, Q]`` (slots are the cache slots the new K/V go to).
        among: ``[B, Q, Q]`` bool, which new tokens each new token may see (itself included).
        view_len: cache slots attention reads (must cover every committed and new slot).
        layers: indices of the decoder layers to run (default all; early exit = ``range(E)``).
        logits_at: ``[B, K]`` positions (into Q) whose logits are wanted; default all Q.
        mask: ``[B, Q, view_len]`` bool to use instead of the one built from the cache and ``among``
        (drafters exploring a tree in scratch slots need one).
        contiguous: the caller promises ``slots == cache.lengths + arange(Q)`` (verification
        steps), which lets full-attention layers use the tree-attention kernel.
        collect: layer counts E whose hidden states to return (the output of the E-th layer run,
        i.e. what an early exit after E layers would normalise), in ``layer_hidden``.
        tree_mask: ``[B, Q, Q]`` bool, the tree kernel's mask among the new tokens (what
        ``_tree_mask`` builds from ``among``), when the caller already holds it: a drafter feeding
        one token per forward passes a constant, since a lone query sees just itself.
        table: ``(table [B, T], first [B], last [B])``: new tokens read the slots ``table[b,
        first[b]:last[b]]``, not their row's committed ones, then the (contiguous) new ones under ``among``.
        """
        layer_ids = range(self.num_layers) if layers is None else list(layers)
        kernel, masks = self._attention_inputs(cache, positions, slots, among, view_len, layer_ids, mask, contiguous,
                                               tree_mask, table)
        cache.write_slots = slots
        cache.view_len = view_len
        hidden = self.base.embed_tokens(tokens)
        rope = self.base.rotary_emb(hidden, position_ids=positions)
        wanted = {e: n for n, e in enumerate(collect or ())}
        kept: list[Tensor | None] = [None] * len(wanted)
        for run, i in enumerate(layer_ids, start=1):
            tree, mask_i = (kernel if self.windows[i] is None or table is not None else None), masks.get(self.windows[i])
            if self.fused is not None:
                hidden = self.fused.run(i, hidden, rope, cache, mask_i, _specdec_attention, tree=tree)
            else:
                hidden = run_layer(self.layers[i], self.rotary[i], hidden, rope, cache, mask_i, _specdec_attention,
                                   tree=tree)
            if run in wanted:
                kept[wanted[run]] = hidden
        if any(h is None for h in kept):
            raise ValueError(f"collect={list(collect)} asks for layer counts outside 1..{len(layer_ids)}")
        logits = None
        if compute_logits:
            h = hidden
            if logits_at is not None:
                h = h.gather(1, logits_at.unsqueeze(-1).expand(*logits_at.shape, h.shape[-1]))
            logits = self.lm_head(self.base.norm(h)).float()
        return RunnerOutput(logits=logits, hidden=hidden if return_hidden else None,
                            layer_hidden=torch.stack(kept) if kept else None)

    def _attention_inputs(self, cache, positions, slots, among, view_len, layer_ids, mask, contiguous, tree_mask,
                          table) -> tuple[tuple | None, dict]:
        """What ``forward``'s layers attend with: the kernel's inputs (None: the dense mask) and the
        dense masks by sliding window (None: full attention), each only where some layer needs it."""
        kernel = None
        if table is not None:
            kernel = self._table_view(table, slots, among, layer_ids, mask, view_len)
        elif contiguous and mask is None and self._use_kernel(slots.device):
            if tree_mask is None:
                tree_mask = self._tree_mask(cache, slots, among)
            kernel = (cache.start, cache.lengths, tree_mask)
        masks = {}
        if table is None and (kernel is None or any(self.windows[i] is not None for i in layer_ids)):
            if mask is None:
                mask = cache.visible(slots, among, view_len)  # [B, Q, S]
            masks[None] = mask
            for window in {self.windows[i] for i in layer_ids} - {None}:
                masks[window] = mask & self._within_window(cache, slots, positions, view_len, window)
        return kernel, masks

    def head(self, hidden: Tensor) -> Tensor:
        """Logits (fp32) from a hidden state: the final norm, then the LM head (early exit)."""
        return self.lm_head(self.base.norm(hidden)).float()

    @staticmethod
    def _tree_mask(cache: KVCache, slots: Tensor, among: Tensor) -> Tensor:
        """``[B, Q, Q]``: the tree kernel's mask among the new tokens, what ``KVCache.visible``
        adds there: padding is never read, every query sees itself."""
        real = slots >= cache.start.unsqueeze(1)
        eye = torch.eye(slots.shape[1], dtype=torch.bool, device=slots.device)
        return (among & real.unsqueeze(1)) | eye

    def _table_view(self, table, slots: Tensor, among: Tensor, layer_ids, mask, view_len: int) -> TableView:
        if mask is not None or any((self.windows[i] or view_len) < view_len for i in layer_ids):
            raise ValueError("forward(table=...) takes no mask, and no sliding window shorter than the view")
        eye = torch.eye(slots.shape[1], dtype=torch.bool, device=slots.device)
        return TableView(*table, slots[:, 0], among | eye, self._use_kernel(slots.device))

    def _use_kernel(self, device: torch.device) -> bool:
        if self.attention == "auto":
            return device.type == "cuda"
        return self.attention == "triton"

    @staticmethod
    def _within_window(cache: KVCache, slots: Tensor, positions: Tensor, view_len: int, window: int) -> Tensor:
        """``[B, Q, S]``: key within ``window`` positions of the query (HF: q_pos - k_pos < window)."""
        j = torch.arange(view_len, device=slots.device)
        key_pos = (j[None, :] - cache.start[:, None]).expand(slots.shape[0], view_len).clone()
        key_pos.scatter_(1, slots, positions)
        return (positions.unsqueeze(-1) - key_pos.unsqueeze(1)) < window
