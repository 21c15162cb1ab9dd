"""The public face: ``wrap(model, drafter=...)`` gives a model whose ``generate`` speculates.

``SpecDecoder.generate`` takes Hugging Face's ``generate`` arguments and returns what HF
returns: a tensor of sequences, or (``return_dict_in_generate=True``) an output object with
``sequences`` plus ``spec_stats``. Options it cannot honour raise ``UnsupportedGenerationOption``
instead of being silently ignored. Every other attribute is forwarded to the wrapped model.

This module translates HF generation options into engine calls; the decoding itself lives in
``specdec.engine``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from specdec import memory, validate
from specdec.drafters import make_drafter
from specdec.engine import SpecEngine
from specdec.stats import SpecStats
from specdec.verifiers.acceptance import SamplingParams
from specdec.verifiers.processors import LogitsOptions


class UnsupportedGenerationOption(ValueError):
    """A ``generate`` option that speculative decoding here cannot honour."""


# Options whose non-default values we refuse, with the reason shown to the user.
_UNSUPPORTED = {
    "num_beams": "beam search", "num_beam_groups": "group beam search", "penalty_alpha": "contrastive search",
    "encoder_repetition_penalty": "encoder repetition penalty",
    "force_words_ids": "constrained decoding", "min_length": "min_length",
    "typical_p": "HF typical sampling (specdec's typical acceptance is a separate, lossy rule)",
    "epsilon_cutoff": "epsilon sampling", "eta_cutoff": "eta sampling",
    "diversity_penalty": "diverse beam search", "sequence_bias": "sequence bias",
    "guidance_scale": "classifier-free guidance",
    "begin_suppress_tokens": "token suppression", "forced_bos_token_id": "forced tokens",
    "forced_eos_token_id": "forced tokens", "exponential_decay_length_penalty": "length penalty decay",
    "output_scores": "returning scores", "output_logits": "returning logits",
    "output_attentions": "returning attentions", "output_hidden_states": "returning hidden states",
    "prompt_lookup_num_tokens": "HF's prompt lookup (use specdec.drafters.PromptLookup)",
    "watermarking_config": "watermarking", "assistant_early_exit": "HF's early-exit assistant",
    "dola_layers": "DoLa decoding", "token_healing": "token healing", "top_h": "top-H sampling",
    "remove_invalid_values": "replacing NaN/inf logits", "constraints": "constrained decoding",
}
# Options specdec applies (the logits processors in specdec.verifiers.processors, and max_time
# checked at every host sync), and options that cannot change the output of greedy or sampled
# decoding without beams or an assistant model (both refused). Any other option set away from
# HF's default is refused by name.
_HONOURED = {"max_length", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "num_return_sequences",
             "eos_token_id", "pad_token_id", "bos_token_id", "return_dict_in_generate", "stop_strings", "max_time"}
_INERT = {"transformers_version", "_from_model_config", "use_cache", "cache_implementation", "cache_config",
          "compile_config", "disable_compile", "prefill_chunk_size", "max_cache_len", "low_memory",
          "continuous_batching_config", "early_stopping", "length_penalty", "num_assistant_tokens",
          "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
          "target_lookbehind", "max_matching_ngram_size", "is_assistant", "assistant_ensemble_weight",
          "decoder_start_token_id", "renormalize_logits"}
_UNSUPPORTED_ARGS = ("logits_processor", "prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids",
                     "negative_prompt_attention_mask", "synced_gpus", "custom_generate", "assistant_tokenizer")


@dataclass
class SpecGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's decoder-only generate output, plus specdec's statistics."""

    spec_stats: SpecStats | None = None


class SpecDecoder:
    """A speculative-decoding view of an HF causal LM. Build it with ``specdec.wrap``."""

    def __init__(self, model, drafter=None, acceptance: str | None = None, attention: str = "auto",
                 max_draft_batch: int | None = None, cuda_graphs: bool = False, chunk_steps: int | None = None,
                 compile: bool | dict = False, fuse: bool | None = None, min_tau: float | str | None = None,
                 pipeline: bool | None = None, cache_len: int | None = None, memory_budget: int | None = None):
        if memory_budget is not None and (isinstance(memory_budget, bool) or memory_budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
        self.__dict__["memory_budget"] = memory_budget
        if isinstance(drafter, str):
            drafter = make_drafter(drafter)
        self.__dict__["model"] = model
        self.__dict__["drafter"] = drafter
        self.__dict__["engine"] = SpecEngine(model, drafter=drafter, acceptance=acceptance, attention=attention,
                                             max_draft_batch=max_draft_batch, cuda_graphs=cuda_graphs,
                                             chunk_steps=chunk_steps, compile=compile, fuse=fuse,
                                             min_tau=min_tau, pipeline=pipeline,
                                             cache_len=cache_len)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __repr__(self) -> str:
        return f"SpecDecoder(model={type(self.model).__name__}, drafter={self.drafter!r})"

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 stopping_criteria: StoppingCriteriaList | None = None, streamer=None, tokenizer=None, **kwargs):
        """Same arguments as HF ``generate`` (the supported subset; see the module docstring)."""
        input_ids, attention_mask, gc = self._arguments(inputs, generation_config, kwargs)
        validate.check_inputs(self.model, input_ids, attention_mask)
        eos = gc.eos_token_id
        eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        pad_id = gc.pad_token_id if gc.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        validate.check_pad_id(self.model, pad_id)
        attention_mask = _attention_mask(input_ids, attention_mask, gc.pad_token_id, eos_ids)
        max_new = self._max_new(gc, input_ids, attention_mask)
        params = _sampling_params(gc, eos_ids, self.model.config.vocab_size)
        copies = gc.num_return_sequences or 1
        if copies > 1:  # as HF: every prompt row repeated, each copy decoded on its own
            input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)

        stop_fn = self._stop_fn(gc, stopping_criteria, tokenizer, input_ids.device)
        on_tokens = _stream_to(streamer, input_ids)
        meter = memory.Meter(self.engine, self.memory_budget, input_ids.shape[0],
                             int(attention_mask.sum(dim=1).max()), max_new)
        out = self.engine.generate(input_ids, attention_mask, max_new, params, eos_ids, pad_id,
                                   stop_fn=stop_fn, on_tokens=on_tokens, max_time=gc.max_time)
        out.stats.memory = meter.report()
        if streamer is not None:
            streamer.end()
        sequences = _sequences(input_ids, out.generated, pad_id)
        if gc.return_dict_in_generate:
            return SpecGenerateOutput(sequences=sequences, spec_stats=out.stats)
        return sequences

    def _arguments(self, inputs, generation_config, kwargs: dict):
        """``(input_ids, attention_mask or None, generation config)`` from HF's generate arguments:
        unsupported arguments and options refused by name, the rest merged into a copy of the
        model's (or the given) generation config."""
        for arg in _UNSUPPORTED_ARGS:
            if kwargs.get(arg) not in (None, [], False):
                raise UnsupportedGenerationOption(f"generate(): {arg!r} is not supported by specdec")
            kwargs.pop(arg, None)
        input_ids = kwargs.pop("input_ids", None)
        if inputs is not None and input_ids is not None:
            raise ValueError("pass the prompt as `inputs` or `input_ids`, not both")
        input_ids = inputs if inputs is not None else input_ids
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("use_cache", None)
        gc = copy.deepcopy(generation_config if generation_config is not None else self.model.generation_config)
        validate.check_lengths(kwargs)
        unknown = gc.update(**kwargs)
        if unknown:
            raise UnsupportedGenerationOption(
                f"generate() got unsupported argument(s) {sorted(unknown)}; specdec passes no extra model inputs")
        self._check_options(gc)
        return input_ids, attention_mask, gc

    def _max_new(self, gc: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        longest = int(attention_mask.sum(dim=1).max())
        max_new = validate.max_new_tokens(gc, input_ids.shape[1])
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and longest + max_new > limit:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the model's context of {limit} "
                "positions; shorten the prompt or lower max_new_tokens")
        return max_new

    @staticmethod
    def _check_options(gc: GenerationConfig) -> None:
        for name, what in _UNSUPPORTED.items():
            value = getattr(gc, name, None)
            # None, False, 0, 1 and empty collections are the "off" values of every option listed.
            if not (value is None or value is False
                    or (not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1))
                    or (isinstance(value, (list, dict, tuple)) and not value)):
                raise UnsupportedGenerationOption(
                    f"generate(): {name}={value!r} ({what}) is not supported by specdec; remove it, or call the "
                    "wrapped model's own generate")
        defaults = GenerationConfig._get_default_generation_params()
        for name, value in gc.to_dict().items():
            if name.startswith("_") or name in _HONOURED or name in _INERT or name in _UNSUPPORTED:
                continue
            if not (value is None or value is False or value == defaults.get(name, None)
                    or (isinstance(value, (list, dict, tuple)) and not value)):
                raise UnsupportedGenerationOption(
                    f"generate(): {name}={value!r} is not supported by specdec; remove it (from the generation "
                    "config too), or call the wrapped model's own generate")
        if gc.max_time is not None and not gc.max_time > 0:
            raise ValueError(f"max_time must be a positive number of seconds, got {gc.max_time!r}")
        if gc.num_return_sequences is not None and (not isinstance(gc.num_return_sequences, int)
                                                    or gc.num_return_sequences < 1):
            raise ValueError(f"num_return_sequences must be a positive int, got {gc.num_return_sequences!r}")

    @staticmethod
    def _stop_fn(gc, stopping_criteria, tokenizer, device):
        criteria = list(stopping_criteria or [])
        if gc.stop_strings:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: call generate(..., tokenizer=tokenizer)")
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=gc.stop_strings))
        if not criteria:
            return None

        def stop(row: int, ids: list[int]) -> bool:
            t = torch.tensor([ids], dtype=torch.long, device=device)
            return any(bool(c(t, None).any()) for c in criteria)

        return stop


def _attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None,
                    eos_ids: set[int]) -> torch.Tensor:
    """The given mask, or HF's default (pad tokens masked when the pad id is not an EOS id);
    refuses rows with no real token."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
        if pad_token_id is not None and pad_token_id not in eos_ids:
            attention_mask = (input_ids != pad_token_id).long()
    empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt in row(s) {empty}: the attention mask has no real tokens")
    return attention_mask


def _stream_to(streamer, input_ids: torch.Tensor):
    """The engine's ``on_tokens`` callback feeding an HF streamer (batch 1), or None."""
    if streamer is None:
        return None
    if input_ids.shape[0] != 1:
        raise ValueError("streaming supports batch size 1 only, as in HF")
    streamer.put(input_ids.cpu())
    return lambda row, new: streamer.put(torch.tensor(new, dtype=torch.long)) if new else None


def _sequences(input_ids: torch.Tensor, generated: list[list[int]], pad_id: int) -> torch.Tensor:
    """``[B, prompt + longest]``: each prompt row, then its generated tokens, right padded with ``pad_id``."""
    width = max(len(g) for g in generated)
    new = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype)
    for r, g in enumerate(generated):
        new[r, : len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def _sampling_params(gc: GenerationConfig, eos_ids: set[int], vocab: int) -> SamplingParams:
    return SamplingParams(do_sample=bool(gc.do_sample), temperature=float(1.0 if gc.temperature is None else gc.temperature),
                          top_k=gc.top_k or None, top_p=gc.top_p, min_p=gc.min_p or None,
                          processors=_logits_options(gc, eos_ids, vocab))


def _logits_options(gc: GenerationConfig, eos_ids: set[int], vocab: int) -> LogitsOptions:
    """The logits processors ``gc`` asks for, with their token ids checked against the vocabulary."""
    words = gc.bad_words_ids or []
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, (list, tuple)) and w for w in words):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids, got {words!r}")
    suppress = list(gc.suppress_tokens or [])
    ids = [t for w in words for t in w] + suppress
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"bad_words_ids / suppress_tokens hold ids {bad[:5]} outside the vocabulary [0, {vocab})")
    # As HF: a bad word that is a single EOS id is dropped (EOS stays possible).
    words = tuple(tuple(w) for w in words if not (len(w) == 1 and w[0] in eos_ids))
    return LogitsOptions(repetition_penalty=float(gc.repetition_penalty or 1.0),
                         no_repeat_ngram_size=int(gc.no_repeat_ngram_size or 0),
                         min_new_tokens=int(gc.min_new_tokens or 0), eos_ids=tuple(sorted(eos_ids)),
                         suppress_tokens=tuple(suppress), bad_words_ids=words)


def wrap(model, drafter=None, acceptance: str | None = None, attention: str = "auto",
         max_draft_batch: int | None = None, cuda_graphs: bool = False, chunk_steps: int | None = None,
         compile: bool | dict = False, fuse: bool | None = None, min_tau: float | str | None = None,
         pipeline: bool | None = None, cache_len: int | None = None, memory_budget: int | None = None) -> SpecDecoder:
    """Wrap an HF causal LM for speculative decoding.

    ``drafter`` is a Drafter instance, a registered name (``"lookup"``), or None for plain
    autoregressive decoding through the same engine. ``acceptance`` picks the rule (default:
    ``greedy`` when ``do_sample=False``, ``speculative`` sampling otherwise). ``attention``
    picks the verification attention: ``auto`` (Triton tree-attention kernel on CUDA, the torch
    reference on CPU), ``reference`` or ``triton``. ``max_draft_batch``: steps with more active
    rows than this verify without a draft (a batch-size policy; None: always draft). ``min_tau``:
    pause drafting, with a growing backoff, while drafted steps keep fewer than this many tokens
    per row on average (``DraftGate``; e.g. 1.4 where a drafted step costs 1.4 plain ones;
    ``"auto"``: measure what a drafted and an undrafted step cost, and pause while drafted tokens
    per second fall below undrafted ones; None: never pause). Both policies stay lossless: an
    undrafted step is plain decoding.
    ``cuda_graphs`` (CUDA only): run ``chunk_steps`` whole steps (propose, verify, accept, commit)
    per host sync, replayed as one captured CUDA graph, greedy or sampling, for every drafter whose
    ``spec.device_only`` is True; others (REST, CopySpec, SWIFT's search, DEL) refuse it. The prefill
    runs in fixed chunks replayed from one graph. ``chunk_steps``: steps per host sync (default 8
    with cuda_graphs, else 1; more than 1 needs a device-only drafter); the host applies stopping
    rules after each run and cuts the rest. ``pipeline``: queue the next run before reading the last
    one back, so the host's work overlaps the device's (default: on with cuda_graphs; costs one
    wasted run when a batch ends at EOS; near ``max_new_tokens`` it queues only while the tokens
    a row kept per run so far say it will still need one). ``compile``: also ``torch.compile`` the target's forward
    and the drafter's own work (its ``compile`` method: a draft model's or LayerSkip's forwards,
    lookup's match); a dict turns it on with those Inductor options, e.g.
    ``{"coordinate_descent_tuning": True}``. With cuda_graphs or compile, steps attend over the
    whole cache, so graphs and kernels depend on the batch size and ``cache_len`` only:
    ``cache_len`` slots per row (default 2048, raised when a call needs more; a call that needs
    more than the current cache builds a bigger one, which captures and compiles again, as does
    ``engine.reserve(batch, max_length)`` ahead of time). ``fuse``: merge each layer's q/k/v and gate/up
    projections into one matmul each (``specdec.fused``; the model's own modules then read views
    of the merged weights, so HF ``generate`` still works); default None: on unless a projection is not a plain ``nn.Linear`` (LoRA, quantised layers).
    ``memory_budget``: bytes of extra device memory drafting may use (``specdec.memory``); each
    call picks the drafter's largest configuration that fits at its batch (draft length, Rapid's
    context) and raises ``MemoryError`` naming the minimum when none does. ``spec_stats.memory``
    reports the choice and the call's peak (measured on CUDA, the analytic extra elsewhere).

    Example::

        spec = specdec.wrap(model, drafter=PromptLookup(num_tokens=8))
        out = spec.generate(input_ids, max_new_tokens=64, return_dict_in_generate=True)
        print(out.spec_stats.tau)
    """
    return SpecDecoder(model, drafter=drafter, acceptance=acceptance, attention=attention,
                       max_draft_batch=max_draft_batch, cuda_graphs=cuda_graphs, chunk_steps=chunk_steps,
                       compile=compile, fuse=fuse, min_tau=min_tau, pipeline=pipeline, cache_len=cache_len,
                       memory_budget=memory_budget)
