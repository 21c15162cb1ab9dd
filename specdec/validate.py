"""Checks of what a caller hands ``generate``, and of the distributions the model hands back.

Input checks run once per call on the host, before anything reaches the engine. Each error
names the argument, what is wrong with it and how to fix it: ``InvalidGenerateInput`` (a
ValueError) for a bad value, ``InvalidGenerateInputType`` (also a TypeError) for a wrong type.

The step's checks run on the device, with no host sync: ``step_faults`` marks, per row, a
drafter's tree that is not a forest, or (under sampling) a draw whose logits hold NaN or
+inf, or are all -inf, so that there is no distribution to sample from. The driver reads the
marks back with the step's other results and raises (``InvalidLogits``, a RuntimeError as HF's
``torch.multinomial`` raises; or ``MalformedDraftTree``) only for a row still decoding there.

It knows tensors and HF generation settings; not the engine's buffers, drafters or tokenizers.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from specdec.verifiers.tree import DraftTree, MalformedDraftTree

HF_DEFAULT_NEW_TOKENS = 20  # what HF generate makes when neither the call nor the model's config sets a length
TREE_FAULT = -1  # step_faults' mark for a row whose draft tree is not a forest


class InvalidGenerateInput(ValueError):
    """A ``generate`` argument with a value that cannot be decoded; the message says the fix."""


class InvalidGenerateInputType(InvalidGenerateInput, TypeError):
    """A ``generate`` argument of the wrong type."""


class InvalidLogits(RuntimeError):
    """The target's logits at a sampled position hold NaN or +inf, or are all -inf."""


def check_inputs(model, input_ids, attention_mask) -> None:
    """Check the prompt and its mask before decoding.

    Example: ``check_inputs(model, torch.tensor([[5, 6.5]]), None)`` raises
    ``InvalidGenerateInputType`` (float ids), where ``.long()`` would silently drop the ``.5``.
    """
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise InvalidGenerateInputType(
            f"generate() needs `input_ids` as a [batch, length] integer tensor, got {shape}; tokenize with "
            "return_tensors='pt', or add the batch dimension with input_ids.unsqueeze(0)")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InvalidGenerateInputType(
            f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass the tokenizer's ids "
            "(torch.long) rather than floats, which would be truncated")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InvalidGenerateInput(
            f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token per row")
    real = None
    if attention_mask is not None:
        real = _check_mask(attention_mask, input_ids)
    _check_vocab(model, input_ids, real)


def _check_mask(mask, input_ids: Tensor) -> Tensor:
    """The mask must match the ids and hold only 0 and 1; returns it as bool ``[B, T]``."""
    if not torch.is_tensor(mask):
        raise InvalidGenerateInputType(
            f"attention_mask must be a tensor like input_ids, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise InvalidGenerateInput(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape {tuple(input_ids.shape)}; "
            "pass the mask the tokenizer returned with these ids (one 0/1 entry per token)")
    if mask.dtype.is_complex:
        raise InvalidGenerateInputType(f"attention_mask must hold 0 and 1, got dtype {mask.dtype}")
    odd = (mask != 0) & (mask != 1)
    if bool(odd.any()):
        r, c = (int(x) for x in odd.nonzero()[0])
        raise InvalidGenerateInput(
            f"attention_mask[{r}, {c}] is {mask[r, c].item()}; a mask holds 1 for real tokens and 0 for padding")
    return mask.bool()


def _check_vocab(model, input_ids: Tensor, real: Tensor | None) -> None:
    """Every real token id must index the model's input embedding."""
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = (input_ids < 0) | (input_ids >= vocab)
    if real is not None:
        bad &= real.to(bad.device)
    if bool(bad.any()):
        r, c = (int(x) for x in bad.nonzero()[0])
        raise InvalidGenerateInput(
            f"input_ids[{r}, {c}] = {int(input_ids[r, c])} is outside the model's vocabulary of {vocab} ids "
            f"(0 .. {vocab - 1}); tokenize with the model's own tokenizer, and resize its embeddings "
            "(model.resize_token_embeddings) if you added tokens")


def check_pad_id(model, pad_id: int) -> None:
    """The pad id fills the engine's padding slots, so it must be a token of the model."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if not isinstance(pad_id, numbers.Integral) or isinstance(pad_id, bool) or not 0 <= pad_id < vocab:
        raise InvalidGenerateInput(
            f"pad_token_id={pad_id!r} is not a token id of the model (0 .. {vocab - 1}); pass the tokenizer's "
            "pad_token_id (or its eos_token_id)")


def _length(name: str, value) -> int | None:
    if value is None:
        return None
    if torch.is_tensor(value) and value.dim() == 0 and not value.dtype.is_floating_point and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidGenerateInputType(
            f"{name} must be a whole number of tokens, got {value!r} ({type(value).__name__}); pass an int, "
            f"e.g. {name}=64")
    return int(value)


def check_lengths(kwargs: dict) -> None:
    """``generate(**kwargs)``'s ``max_new_tokens`` and ``max_length`` must be whole numbers; checked
    before HF's ``GenerationConfig.update``, whose own check fails with a bare comparison error."""
    for name in ("max_new_tokens", "max_length"):
        _length(name, kwargs.get(name))


def max_new_tokens(gc, prompt_width: int) -> int:
    """New tokens per row, from ``gc.max_new_tokens``, else ``gc.max_length`` (prompt included),
    else HF's default of 20 new tokens. Raises unless a positive whole number results."""
    new = _length("max_new_tokens", gc.max_new_tokens)
    total = _length("max_length", gc.max_length)
    if new is None and total is None:
        new = HF_DEFAULT_NEW_TOKENS
    elif new is None:
        new = total - prompt_width
        if new <= 0:
            raise InvalidGenerateInput(
                f"max_length={total} leaves no room for new tokens after a prompt of {prompt_width}; pass "
                "max_new_tokens (the number of tokens to generate) instead")
    if new <= 0:
        raise InvalidGenerateInput(f"max_new_tokens must be a positive integer, got {new}")
    return new


def step_faults(tree: DraftTree, logits: Tensor, path: Tensor, sampling: bool, temperature: float) -> Tensor:
    """``[B]`` long, on the device: 0 when the step is sound for a row, ``TREE_FAULT`` when its
    tree is not a forest, else ``1 + k`` for the first of its draws ``k`` (0: at the root, k: after
    the k-th accepted node) whose distribution is not one. ``logits`` is ``[B, 1 + N, V]``,
    ``path`` the accepted nodes ``[B, N]`` (-1 padded). Greedy (``sampling=False``) has no draw to
    check: HF's argmax takes NaN logits without complaint, and so does greedy acceptance.
    """
    if sampling:
        # max(x / T) = max(x) / T for T > 0; NaN propagates through the max, +inf or an all -inf row
        # survive it, and either makes the softmax NaN (HF's multinomial then raises).
        top = logits.amax(dim=-1).float() / temperature  # [B, 1 + N]
        broken = (top - top) != 0  # not finite: inf - inf and NaN - NaN are NaN (two kernels; isfinite takes four)
        # [B, 1 + N] position of each draw: the root, then after each accepted node. Padding (-1)
        # points at the root again, which cannot come first unless the root's draw is the fault.
        draws = torch.nn.functional.pad(path + 1, (1, 0))
        at = broken.gather(1, draws)
        faults = (at.long().argmax(dim=1) + 1) * at.any(dim=1)
    else:
        faults = torch.zeros(tree.batch, dtype=torch.long, device=logits.device)
    if tree.known_forest:
        return faults
    return torch.where(tree.malformed(), torch.full_like(faults, TREE_FAULT), faults)


def raise_fault(fault: int, row: int, generated: int) -> None:
    """The host side of ``step_faults``: raise for row ``row``, which had ``generated`` new tokens."""
    if fault == TREE_FAULT:
        raise MalformedDraftTree(
            f"the drafter's DraftTree for row {row} (after {generated} new tokens) is not a forest: each node's "
            "parent must be -1 (the root) or an earlier node. Call tree.check() on its proposals to see the "
            "node, and build trees parents-first (DraftTree.chain, branches or from_paths do)")
    raise InvalidLogits(
        f"the target's logits for row {row} at new token {generated} hold NaN or +inf (or are all -inf), so "
        "there is no distribution to sample from (HF's generate raises here too: 'probability tensor contains "
        "either inf, nan or element < 0'). Check the model's weights and dtype (float16 can overflow: try "
        "bfloat16 or float32), or decode greedily with do_sample=False")
