"""Fused projections: one matmul for q/k/v and one for gate/up in every decoder layer.

A small model's decode step on a GPU is bound by kernel launches, not memory bandwidth: each
of SmolLM2's 30 layers runs seven projection GEMMs on a single token. Concatenating the q, k
and v weights (and the gate and up weights) turns five of them into two, as gpt-fast does.

``FusedLayers(runner_layers)`` concatenates the weights once and then re-points the HF modules'
own ``weight`` (and ``bias``) at row slices of the fused tensors, so memory is not doubled and
HF's ``generate`` on the same model still works and reads the very same numbers.

``FusedLayers.run(i, hidden, ...)`` is the decoder layer's forward written out for the
supported architectures (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms). It
uses HF's own norms, rotary helper, activation and output projections; only the projection
matmuls are merged. The runner calls it instead of the HF layer when fusing is on.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn


def unfusable(layers) -> str | None:
    """Why these layers cannot be fused (adapters, quantised or otherwise wrapped projections),
    or None when they can."""
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        mods = [(f"self_attn.{n}", getattr(attn, n, None)) for n in names]
        mods += [(f"mlp.{n}", getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")]
        for name, mod in mods:
            if type(mod) is not nn.Linear:  # a LoRA wrapper or a quantised linear would be bypassed
                return f"layer {i} {name} is {type(mod).__name__}, not a plain torch.nn.Linear"
        if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
            return f"layer {i}: gate/up projections with a bias"
        if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) > 1:
            return f"layer {i}: q/k/v projections disagree on having a bias"
    return None


class FusedLayers:
    """Fused q/k/v and gate/up weights of a list of HF decoder layers.

    Example::

        fused = FusedLayers(list(model.model.layers))
        hidden = fused.run(0, hidden, rope, cache, mask, attend)
    """

    def __init__(self, layers):
        reason = unfusable(layers)
        if reason is not None:
            raise ValueError(f"cannot fuse projections: {reason}; pass fuse=False")
        self.layers = layers
        self.qkv: list[tuple[Tensor, Tensor | None, tuple[int, int, int]]] = []
        self.gate_up: list[tuple[Tensor, int]] = []
        self.rotary = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            weight = _fuse([p.weight for p in projections])
            biases = [p.bias for p in projections]
            bias = _fuse(biases) if biases[0] is not None else None
            sizes = tuple(p.weight.shape[0] for p in projections)
            _repoint(projections, weight, bias)
            self.qkv.append((weight, bias, sizes))
            gu = _fuse([mlp.gate_proj.weight, mlp.up_proj.weight])
            _repoint((mlp.gate_proj, mlp.up_proj), gu, None)
            self.gate_up.append((gu, mlp.gate_proj.weight.shape[0]))
            self.rotary.append(importlib.import_module(type(attn).__module__).apply_rotary_pos_emb)

    def current(self, layers) -> bool:
        """Whether these are still our layers and their modules still read the fused weights
        (``model.to(...)`` gives modules fresh tensors and leaves the fused copy stale)."""
        return layers == self.layers and all(
            layer.self_attn.q_proj.weight.data_ptr() == qkv[0].data_ptr()
            and layer.mlp.gate_proj.weight.data_ptr() == gu[0].data_ptr()
            for layer, qkv, gu in zip(layers, self.qkv, self.gate_up))

    def run(self, i: int, hidden: Tensor, rope: tuple[Tensor, Tensor], cache, mask: Tensor | None, attend,
            tree=None) -> Tensor:
        """Decoder layer ``i`` over ``hidden`` ``[B, Q, H]``; ``attend`` is the runner's attention
        function (``(module, q, k, v, mask, scaling=..., specdec_tree=...) -> ([B, Q, heads, D], _)``)."""
        layer = self.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        weight, bias, (nq, nk, _) = self.qkv[i]
        b, q = hidden.shape[:2]
        d = attn.head_dim
        x = layer.input_layernorm(hidden)
        qkv = nn.functional.linear(x, weight, bias)
        query = qkv[..., :nq].view(b, q, -1, d)
        key = qkv[..., nq: nq + nk].view(b, q, -1, d)
        value = qkv[..., nq + nk:].view(b, q, -1, d)
        if hasattr(attn, "q_norm"):
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        query, key = self.rotary[i](query, key, *rope)
        key, value = cache.update(key, value, attn.layer_idx)
        out, _ = attend(attn, query, key, value, mask, scaling=attn.scaling, specdec_tree=tree)
        hidden = hidden + attn.o_proj(out.reshape(b, q, -1))
        x = layer.post_attention_layernorm(hidden)
        gu, inter = self.gate_up[i]
        h = nn.functional.linear(x, gu)
        return hidden + mlp.down_proj(mlp.act_fn(h[..., :inter]) * h[..., inter:])


def run_layer(layer, rotary, hidden: Tensor, rope: tuple[Tensor, Tensor], cache, mask: Tensor | None, attend,
              tree=None) -> Tensor:
    """Decoder layer ``layer`` over ``hidden`` ``[B, Q, H]`` without fused weights: the same
    written-out forward as ``FusedLayers.run``, calling each projection module (a LoRA or a
    quantised linear included). The runner uses it for layers it cannot fuse, so it never goes
    through HF's attention dispatch (``config._attn_implementation``), which HF's own forward reads."""
    attn = layer.self_attn
    b, q = hidden.shape[:2]
    d = attn.head_dim
    x = layer.input_layernorm(hidden)
    query, key, value = (p(x).view(b, q, -1, d) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if hasattr(attn, "q_norm"):
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    query, key = rotary(query, key, *rope)
    key, value = cache.update(key, value, attn.layer_idx)
    out, _ = attend(attn, query, key, value, mask, scaling=attn.scaling, specdec_tree=tree)
    hidden = hidden + attn.o_proj(out.reshape(b, q, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _fuse(tensors) -> Tensor:
    return torch.cat([t.detach() for t in tensors], dim=0)


def _repoint(modules, weight: Tensor, bias: Tensor | None) -> None:
    """Make each module's weight (and bias) a view of its rows of the fused tensors."""
    row = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[row: row + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[row: row + n], requires_grad=m.bias.requires_grad)
        row += n
