"""Draft-head models that read a target's hidden states: an EAGLE-3 style head and Medusa heads.

- `EagleHeadModel` (Li et al. 2025, EAGLE-3): fuses the target's hidden states at a few layers
  (``fc``: nA·H -> H), then runs ONE decoder layer of the target's own architecture on
  [embedding of the token, fused state], then a norm and an LM head over a draft vocabulary.
  Its output state feeds its next step (EAGLE's feature recurrence).
- `MedusaHeadsModel` (Cai et al. 2024): K heads of residual blocks on the target's last hidden
  state; head k predicts the token k + 2 places ahead (the target's own head gives the next one).

Both save to and load from the speculators layout that vLLM reads: a folder with ``config.json``
and ``model.safetensors``. Loading reads safetensors and JSON only (never a pickle) and checks
every tensor's name and shape.

Glossary and shapes (B rows, Q query tokens, H hidden size, V target vocabulary, Vd draft
vocabulary, nA fused layers, K Medusa heads):
- aux hidden: the target's hidden states at ``aux_layers``, concatenated: [B, Q, nA·H]. Layer id
  ``a`` is the *input* of decoder layer ``a``, i.e. HF's ``output_hidden_states[a]`` (0 is the
  embedding output), as vLLM's ``eagle_aux_hidden_state_layer_ids`` count.
- d2t [Vd] int64: target id = draft id + d2t[draft id]. t2d [V] bool: target ids in the draft vocab.

This module knows modules, shapes and files. It knows nothing about trees, acceptance rules,
the engine or training.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from specdec import zoo

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class HeadCheckpointError(ValueError):
    """A head folder that does not fit the model it claims to hold; the message names the problem."""


class VerifierMismatchError(ValueError):
    """A head used with another target than the one its config.json records as its verifier."""


@dataclass
class HeadOutput:
    logits: Tensor  # [B, Q, Vd] over the draft vocabulary (`EagleHeadModel.to_target` maps ids back)
    hidden: Tensor  # [B, Q, H] the layer's output before the norm: the next step's ``hidden`` input


class HeadCache:
    """The head's own K/V for its one attention layer; grows with each step, rolls back with `crop`.

    It is the ``cache`` object HF attention receives: ``update(k, v, layer_idx)`` appends
    ``[B, H_kv, Q, D]`` and returns everything so far, ``[B, H_kv, S, D]``. (The engine's
    preallocated `specdec.cache.KVCache` speaks the same protocol.)
    """

    def __init__(self):
        self.key: Tensor | None = None    # [B, H_kv, S, D]
        self.value: Tensor | None = None  # [B, H_kv, S, D]

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def update(self, key: Tensor, value: Tensor, layer_idx: int = 0, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.key is not None:
            key, value = torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)
        self.key, self.value = key, value
        return key, value

    def crop(self, length: int) -> None:
        """Keep the first ``length`` slots (rollback after a rejected draft)."""
        if self.key is not None:
            self.key, self.value = self.key[..., :length, :], self.value[..., :length, :]


def cache_kwargs(attention: nn.Module, cache) -> dict:
    """``{name: cache}`` for an HF attention module's forward: transformers 5.24 calls the argument
    ``cache``, earlier 5.x releases (5.17 included) ``past_key_values``."""
    params = inspect.signature(type(attention).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def causal_mask(batch: int, query: int, past: int, device) -> Tensor:
    """[B, 1, Q, past + Q] bool: each new token sees every past slot and the new tokens up to itself."""
    i = torch.arange(query, device=device)[:, None]
    j = torch.arange(past + query, device=device)[None, :]
    return (j <= past + i).expand(batch, 1, query, past + query)


def eagle3_aux_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layers: (2, L // 2, L - 3)."""
    return (2, num_layers // 2, num_layers - 3)


def arch_classes(config) -> dict[str, type]:
    """The decoder-layer, RMSNorm and rotary-embedding classes of ``config``'s architecture.

    Example: a `Qwen3Config` gives ``Qwen3DecoderLayer``, ``Qwen3RMSNorm`` and ``Qwen3RotaryEmbedding``.
    """
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"no causal-LM architecture for config type {type(config).__name__}") from None
    module = sys.modules[model_class.__module__]
    prefix = model_class.__name__.removesuffix("ForCausalLM")
    names = {"layer": f"{prefix}DecoderLayer", "norm": f"{prefix}RMSNorm", "rotary": f"{prefix}RotaryEmbedding"}
    missing = [n for n in names.values() if not hasattr(module, n)]
    if missing:
        raise ValueError(f"cannot build a head for {config.model_type}: {module.__name__} has no {missing}")
    return {key: getattr(module, name) for key, name in names.items()}


def layer_config(target_config):
    """The target's config cut to one decoder layer, with SDPA attention: the head's layer config."""
    config = copy.deepcopy(target_config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"]
    config._attn_implementation = "sdpa"
    return config


def _widen_inputs(attention: nn.Module, in_features: int) -> None:
    """Give q/k/v projections ``in_features`` inputs (EAGLE-3 attends over [embedding, state], 2H)."""
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attention, name)
        setattr(attention, name, nn.Linear(in_features, old.out_features, bias=old.bias is not None))


class EagleHeadModel(nn.Module):
    """EAGLE-3 style draft head: fused target states + token embedding -> one decoder layer -> logits.

    The layer's attention reads [input_layernorm(embed(token)), hidden_norm(state)] (2H), as in
    EAGLE-3 and vLLM's ``Eagle3LlamaForCausalLM``: its q/k/v projections take 2H inputs, while the
    residual stream carries the state (H). Everything else is the target architecture's own
    decoder layer (``LlamaDecoderLayer``, ``Qwen3DecoderLayer``, ...), so q/k norms and biases follow it.

    Args:
        config: the target's config cut to one layer (`layer_config`); its class picks the architecture.
        aux_layers: target layer ids whose input hidden states ``fc`` fuses.
        draft_vocab_size: Vd; None means the whole vocabulary (d2t all zero, t2d all true).
        verifier: {"name_or_path", "architectures"} of the target, recorded in config.json.

    Tensors (``state_dict`` names are the checkpoint's): ``embed_tokens.weight`` [V, H] (frozen
    copy of the target's), ``fc.weight`` [H, nA·H], ``layers.0.*`` (the decoder layer plus
    ``layers.0.hidden_norm.weight``), ``norm.weight`` [H], ``lm_head.weight`` [Vd, H], ``d2t``, ``t2d``.
    """

    def __init__(self, config, aux_layers: Sequence[int], draft_vocab_size: int | None = None,
                 verifier: dict | None = None):
        super().__init__()
        classes = arch_classes(config)
        hidden, vocab = config.hidden_size, config.vocab_size
        self.config, self.aux_layers, self.verifier = config, tuple(int(a) for a in aux_layers), verifier or {}
        self.draft_vocab_size = draft_vocab_size or vocab
        self.embed_tokens = nn.Embedding(vocab, hidden).requires_grad_(False)
        self.fc = nn.Linear(len(self.aux_layers) * hidden, hidden, bias=False)
        layer = classes["layer"](config, layer_idx=0)
        _widen_inputs(layer.self_attn, 2 * hidden)
        layer.hidden_norm = classes["norm"](hidden, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([layer])
        self.norm = classes["norm"](hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, self.draft_vocab_size, bias=False)
        self.rotary_emb = classes["rotary"](config=config)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.full((vocab,), self.draft_vocab_size == vocab, dtype=torch.bool))
        self.borrows_embedding = False  # its checkpoint left the embedding out: `take_embedding` fills it
        self._embedding_ready = True

    @classmethod
    def from_target(cls, target, aux_layers: Sequence[int] | None = None,
                    draft_vocab: Tensor | None = None) -> "EagleHeadModel":
        """A new head for ``target`` (fp32, on its device): embedding, final norm and LM head copied.

        ``aux_layers`` defaults to EAGLE-3's (2, L//2, L-3); ``draft_vocab`` [Vd] is the target ids
        of a reduced vocabulary (e.g. `draft_vocab_from_counts`), None for the whole vocabulary.

        Example:
            >>> head = EagleHeadModel.from_target(smollm2)       # 30 layers: aux_layers (2, 15, 27)
            >>> out = head(ids, head.fuse(aux), positions)       # logits [B, Q, V], hidden [B, Q, 576]
        """
        num_layers = target.config.num_hidden_layers
        aux = tuple(aux_layers) if aux_layers is not None else eagle3_aux_layers(num_layers)
        if not aux or any(not 0 <= a < num_layers for a in aux):
            raise ValueError(f"aux_layers must be target layer ids in [0, {num_layers}), got {list(aux)}")
        verifier = {"name_or_path": target.config.name_or_path or None,
                    "architectures": list(target.config.architectures or [type(target).__name__])}
        vocab = None if draft_vocab is None else draft_vocab.to(torch.long).cpu()
        head = cls(layer_config(target.config), aux, None if vocab is None else len(vocab), verifier)
        base = target.base_model
        with torch.no_grad():
            head.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
            head.norm.weight.copy_(base.norm.weight)
            lm = target.get_output_embeddings().weight
            head.lm_head.weight.copy_(lm if vocab is None else lm[vocab.to(lm.device)])
            if vocab is not None:
                head.set_draft_vocab(vocab)
        return head.to(device=lm.device, dtype=torch.float32)

    def set_draft_vocab(self, vocab: Tensor) -> None:
        """Fill d2t/t2d from ``vocab`` [Vd]: the target id of each draft id, ascending."""
        if len(vocab) != self.draft_vocab_size or not bool((vocab[1:] > vocab[:-1]).all()):
            raise ValueError(f"draft vocab must be {self.draft_vocab_size} ascending distinct target ids")
        vocab = vocab.to(self.d2t.device)
        self.d2t.copy_(vocab - torch.arange(len(vocab), device=vocab.device))
        self.t2d.zero_()
        self.t2d[vocab] = True

    def take_embedding(self, target) -> None:
        """Copy ``target``'s input embedding into the frozen ``embed_tokens`` (a checkpoint saved
        with ``include_embedding=False`` borrows it; `EagleHead` does this when it binds)."""
        weight = target.get_input_embeddings().weight
        if weight.shape != self.embed_tokens.weight.shape:
            raise VerifierMismatchError(f"EagleHead: the target's embedding is {tuple(weight.shape)}, the head "
                                        f"needs {tuple(self.embed_tokens.weight.shape)}")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)
        self._embedding_ready = True

    def to_target(self, draft_ids: Tensor) -> Tensor:
        """Draft-vocabulary ids (any shape) -> target ids (same shape)."""
        return draft_ids + self.d2t[draft_ids]

    def fuse(self, aux_hidden: Tensor) -> Tensor:
        """[B, Q, nA·H] concatenated target states at ``aux_layers`` -> [B, Q, H] step-0 state."""
        return self.fc(aux_hidden)

    def forward(self, token_ids: Tensor, hidden: Tensor, positions: Tensor, cache=None,
                mask: Tensor | None = None) -> HeadOutput:
        """One head step over Q new tokens.

        Args:
            token_ids: [B, Q] the token each slot reads (at depth 0, the token the target chose).
            hidden: [B, Q, H] the state each slot reads: `fuse` of the target's aux states at
                depth 0, the previous step's ``HeadOutput.hidden`` after that.
            positions: [B, Q] position ids of ``token_ids`` (rotary embedding).
            cache: an object with HF's ``update(key, value, layer_idx)`` (`HeadCache`, or the
                engine's ``KVCache``); it receives this step's K/V and returns all S slots. None:
                the Q tokens attend only among themselves.
            mask: [B, 1, Q, S] bool, True where a query may attend. None (no cache or a
                `HeadCache` only): `causal_mask` over the cache's past slots and the new tokens.
        """
        b, q = token_ids.shape
        if not self._embedding_ready:
            raise RuntimeError("this head's checkpoint left its embedding out: call take_embedding(target) first "
                               "(EagleHead does when it binds), or load it with from_pretrained(..., target=target)")
        if mask is None:
            if cache is not None and not isinstance(cache, HeadCache):
                raise ValueError("pass mask= with a cache other than HeadCache (its slots are the caller's)")
            mask = causal_mask(b, q, cache.length if cache is not None else 0, token_ids.device)
        layer = self.layers[0]
        embeds = self.embed_tokens(token_ids).to(hidden.dtype)                                  # [B, Q, H]
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)     # [B, Q, 2H]
        rope = self.rotary_emb(hidden, positions)                                             # cos, sin [B, Q, D]
        attn, _ = layer.self_attn(hidden_states=x, position_embeddings=rope, attention_mask=mask,
                                  **cache_kwargs(layer.self_attn, cache))
        h = hidden + attn                                                                     # [B, Q, H]
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return HeadOutput(self.lm_head(self.norm(h)), h)

    # ---- checkpoints ------------------------------------------------------------------------
    def speculators_config(self, speculative_tokens: int = 3) -> dict:
        """config.json in the speculators layout (``speculators_model_type: eagle3``)."""
        return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                "transformer_layer_config": _config_dict(self.config),
                "eagle_aux_hidden_state_layer_ids": list(self.aux_layers),
                "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.config.hidden_size,
                "norm_before_residual": False,
                "speculators_config": _proposal("eagle3", speculative_tokens, self.verifier)}

    def save_pretrained(self, folder, speculative_tokens: int = 3, include_embedding: bool = True,
                        dtype: torch.dtype | None = None) -> Path:
        """Write config.json and model.safetensors; ``include_embedding=False`` leaves out the
        frozen embedding copy (`from_pretrained` then takes it from ``target``); ``dtype`` (e.g.
        torch.bfloat16) stores the floating-point tensors in that type."""
        tensors = self.state_dict()
        if not include_embedding:
            tensors.pop("embed_tokens.weight")
        return _write_folder(folder, self.speculators_config(speculative_tokens), _in_dtype(tensors, dtype))

    @classmethod
    def from_pretrained(cls, folder, target=None, device=None) -> "EagleHeadModel":
        """Load a `save_pretrained` folder or a shipped ``zoo:<head>`` name (fp32).

        A checkpoint without its embedding takes ``target``'s; with no ``target`` the head
        borrows it later (`take_embedding`, which `EagleHead` calls when it binds).

        Example:
            >>> head = EagleHeadModel.from_pretrained("zoo:smollm2-135m-instruct-eagle")  # doctest: +SKIP
        """
        folder = resolve_folder(folder, "eagle3")
        config, tensors = _read_folder(folder, "eagle3")
        head = cls(_config_from_dict(config["transformer_layer_config"], folder),
                   config["eagle_aux_hidden_state_layer_ids"], config.get("draft_vocab_size"),
                   config.get("speculators_config", {}).get("verifier"))
        if "embed_tokens.weight" not in tensors:
            if target is not None:
                tensors["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().float().cpu()
            else:
                tensors["embed_tokens.weight"] = torch.zeros_like(head.embed_tokens.weight)
                head.borrows_embedding, head._embedding_ready = True, False
        _load_checked(head, tensors, folder)
        return head.to(device) if device is not None else head


class ResidualBlock(nn.Module):
    """``num_layers`` times x <- x + SiLU(W x + b), W and b starting at zero (the identity)."""

    def __init__(self, hidden: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(num_layers)])
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., H] -> [..., H]
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class MedusaHeadsModel(nn.Module):
    """K Medusa heads on the target's last hidden state (after its final norm).

    At position t (the target has read token t and predicts t + 1), head k (0-based) predicts
    token t + k + 2. Each head is a `ResidualBlock` then its own LM head, started as a copy of the
    target's, so an untrained head guesses what the target would say next.

    Args:
        config: the target's config (hidden_size and vocab_size; recorded as transformer_layer_config).
        num_heads: K. num_layers: residual layers per head.
        verifier: {"name_or_path", "architectures"} of the target, recorded in config.json.

    Tensors (checkpoint names, as vLLM's Medusa model names them): ``blocks.{k}.layers.{j}.weight``
    [H, H], ``blocks.{k}.layers.{j}.bias`` [H], ``lm_heads.{k}.weight`` [V, H].
    """

    def __init__(self, config, num_heads: int = 4, num_layers: int = 1, verifier: dict | None = None,
                 shared_lm_head: bool = False):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"Medusa needs num_heads >= 1 and num_layers >= 1, got {num_heads}, {num_layers}")
        hidden, vocab = config.hidden_size, config.vocab_size
        self.config, self.num_heads, self.num_layers, self.verifier = config, num_heads, num_layers, verifier or {}
        self.shared_lm_head = shared_lm_head
        self.blocks = nn.ModuleList([ResidualBlock(hidden, num_layers) for _ in range(num_heads)])
        self.lm_heads = nn.ModuleList([] if shared_lm_head else
                                      [nn.Linear(hidden, vocab, bias=False) for _ in range(num_heads)])
        self._shared: Tensor | None = None  # [V, H] the target's LM head weight (shared_lm_head), not saved

    def share_lm_head(self, target) -> None:
        """Use ``target``'s own LM head for every head (``shared_lm_head``); the weight is not copied."""
        if self.shared_lm_head:
            self._shared = target.get_output_embeddings().weight.detach()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def head_logits(self, k: int, x: Tensor) -> Tensor:
        """Head k's LM head on block output ``x`` [..., H] -> [..., V]."""
        if not self.shared_lm_head:
            return self.lm_heads[k](x)
        if self._shared is None:
            raise RuntimeError("these Medusa heads share the target's LM head: call share_lm_head(target) first")
        return nn.functional.linear(x.to(self._shared.dtype), self._shared)

    @classmethod
    def from_target(cls, target, num_heads: int = 4, num_layers: int = 1,
                    shared_lm_head: bool = False) -> "MedusaHeadsModel":
        """New heads for ``target`` (fp32, on its device), each LM head a copy of the target's, or
        (``shared_lm_head``) the target's own frozen LM head, which keeps the checkpoint small."""
        verifier = {"name_or_path": target.config.name_or_path or None,
                    "architectures": list(target.config.architectures or [type(target).__name__])}
        config = copy.deepcopy(target.config)
        heads = cls(config, num_heads, num_layers, verifier, shared_lm_head)
        lm = target.get_output_embeddings().weight
        with torch.no_grad():
            for head in heads.lm_heads:
                head.weight.copy_(lm)
        heads = heads.to(device=lm.device, dtype=torch.float32)
        heads.share_lm_head(target)
        return heads

    def forward(self, hidden: Tensor) -> Tensor:
        """[B, Q, H] the target's last hidden states -> [K, B, Q, V] logits, head k for token t + k + 2."""
        return torch.stack([self.head_logits(k, block(hidden)) for k, block in enumerate(self.blocks)])

    def speculators_config(self) -> dict:
        """config.json: the speculators fields, with ``speculators_model_type: medusa``."""
        return {"architectures": ["MedusaSpeculator"], "speculators_model_type": "medusa",
                "transformer_layer_config": _config_dict(self.config),
                "draft_vocab_size": self.config.vocab_size, "medusa_num_heads": self.num_heads,
                "medusa_num_layers": self.num_layers, "shared_lm_head": self.shared_lm_head,
                "speculators_config": _proposal("medusa", self.num_heads, self.verifier)}

    def save_pretrained(self, folder, dtype: torch.dtype | None = None) -> Path:
        """Write config.json and model.safetensors (in ``dtype``, e.g. torch.bfloat16, if given)."""
        return _write_folder(folder, self.speculators_config(), _in_dtype(self.state_dict(), dtype))

    @classmethod
    def from_pretrained(cls, folder, device=None, target=None) -> "MedusaHeadsModel":
        """Load a `save_pretrained` folder or a shipped ``zoo:<head>`` name (fp32); heads that share
        the LM head take it from ``target``."""
        folder = resolve_folder(folder, "medusa")
        config, tensors = _read_folder(folder, "medusa")
        heads = cls(_config_from_dict(config["transformer_layer_config"], folder), config["medusa_num_heads"],
                    config["medusa_num_layers"], config.get("speculators_config", {}).get("verifier"),
                    bool(config.get("shared_lm_head", False)))
        _load_checked(heads, tensors, folder)
        heads = heads.to(device) if device is not None else heads
        if target is not None:
            heads.share_lm_head(target)
        return heads


def draft_vocab_from_counts(counts: Tensor, size: int) -> Tensor:
    """The ``size`` most frequent target ids of ``counts`` [V] (ties: lower id), ascending: [size]."""
    if not 0 < size <= len(counts):
        raise ValueError(f"draft_vocab_size must be in [1, {len(counts)}], got {size}")
    order = torch.sort(-counts.to(torch.long), stable=True).indices[:size]  # most frequent first
    return order.sort().values


# ---- the speculators folder -----------------------------------------------------------------
_LOADERS = {"eagle3": "EagleHead", "medusa": "MedusaHeads", "kangaroo": "KangarooAdapter"}


def resolve_folder(folder, model_type: str) -> Path:
    """The head folder ``folder`` names: a path, or ``zoo:<head>`` for a head shipped in the
    package (`specdec.zoo.head_dir`, which names the build command when it is missing).

    Example: ``resolve_folder("zoo:smollm2-135m-instruct-eagle", "eagle3")`` is
    ``<site-packages>/specdec/data/heads/smollm2-135m-instruct-eagle``.
    """
    text = os.fspath(folder)
    if not text.startswith("zoo:"):
        return Path(text)
    entry = zoo.get_head(text)
    if entry.kind != model_type:
        raise HeadCheckpointError(f"{text} is a {entry.kind} head, not a {model_type} one; load it with "
                                  f"{_LOADERS.get(entry.kind, entry.kind)}.from_pretrained")
    return zoo.head_dir(entry.name)


def model_identity(name_or_path) -> str | None:
    """What the verifier check compares: ``zoo:<name>`` for a zoo model (its name, or its dense
    cache folder ``.../zoo/<name>/dense`` on any machine), a resolved path for an existing
    folder, else the name as given; None when there is none.

    Example: ``model_identity("/root/.cache/specdec/zoo/smollm2-135m-instruct/dense")`` is
    ``"zoo:smollm2-135m-instruct"``.
    """
    if not name_or_path:
        return None
    text = str(name_or_path).rstrip("/")
    if text.startswith("zoo:"):
        return text
    parts = Path(text).parts
    if len(parts) >= 3 and parts[-3] == "zoo" and parts[-1] == "dense" and parts[-2] in zoo.ZOO:
        return f"zoo:{parts[-2]}"
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def check_verifier(name: str, verifier: dict, config) -> None:
    """Raise `VerifierMismatchError` when a head's recorded verifier ({"name_or_path",
    "architectures"} from its config.json) is another model than the target's HF ``config``.
    A side that records nothing is not compared (random-init models carry no name)."""
    want_arch, got_arch = set(verifier.get("architectures") or []), set(getattr(config, "architectures", None) or [])
    want, got = model_identity(verifier.get("name_or_path")), model_identity(getattr(config, "name_or_path", None))
    fix = ("use it with the target it was trained on, or train one for this target (specdec-train "
           "method=eagle|medusa|kangaroo model.spec=...)")
    if want_arch and got_arch and not want_arch & got_arch:
        raise VerifierMismatchError(f"{name}: the head was trained on a {sorted(want_arch)} target, this one is "
                                    f"{sorted(got_arch)}; {fix}")
    if want and got and want != got:
        raise VerifierMismatchError(
            f"{name}: the head was trained on {want} (config.json speculators_config.verifier.name_or_path) but "
            f"the target is {got}; {fix}. If they are the same model under two names, set verifier.name_or_path "
            f"in the head's config.json to {got}")


def _proposal(algorithm: str, speculative_tokens: int, verifier: dict) -> dict:
    return {"algorithm": algorithm, "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens)}],
            "verifier": {"name_or_path": verifier.get("name_or_path"),
                         "architectures": list(verifier.get("architectures") or [])}}


def _config_dict(config) -> dict:
    plain = config.to_dict()
    plain.pop("_attn_implementation", None)
    return plain


def _config_from_dict(plain: dict, folder):
    from transformers import AutoConfig

    plain = dict(plain)
    model_type = plain.pop("model_type", None)
    if model_type is None:
        raise HeadCheckpointError(f"{Path(folder) / CONFIG_NAME}: transformer_layer_config has no model_type")
    config = AutoConfig.for_model(model_type, **plain)
    config._attn_implementation = "sdpa"
    return config


def _write_folder(folder, config: dict, tensors: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    return folder


def _read_folder(folder, model_type: str) -> tuple[dict, dict]:
    """(config.json as a dict, model.safetensors as tensors); checks the files and their kind."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise HeadCheckpointError(f"{folder} has no {name} (heads load from safetensors only)")
    config = json.loads((folder / CONFIG_NAME).read_text())
    found = config.get("speculators_model_type")
    if found != model_type:
        raise HeadCheckpointError(f"{folder / CONFIG_NAME}: speculators_model_type is {found!r}, "
                                  f"expected {model_type!r}")
    return config, load_file(str(folder / WEIGHTS_NAME))


def _in_dtype(tensors: dict, dtype: torch.dtype | None) -> dict:
    """Floating-point tensors cast to ``dtype`` (None: as they are); integer and bool maps untouched."""
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _kind(t: Tensor) -> str:
    return "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else "int"


def _load_checked(module: nn.Module, tensors: dict, folder) -> None:
    """Copy ``tensors`` into ``module`` after checking names, shapes and dtypes; else say what is wrong."""
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    for k in expected.keys() & tensors.keys():
        want, got = expected[k], tensors[k]
        if want.shape != got.shape:
            problems.append(f"{k} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif _kind(want) != _kind(got):
            problems.append(f"{k} has dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise HeadCheckpointError(f"{Path(folder) / WEIGHTS_NAME} does not fit {type(module).__name__}: "
                                  + "; ".join(sorted(problems)))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
