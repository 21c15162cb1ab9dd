"""Draft models for training: build one from the target's layers, add LoRA, save it, load it back.

A draft built from layers copies the target's embedding, the chosen decoder layers, the final
norm and the LM head into a config with that many layers, so it starts out as an early exit of
the target. A LoRA draft saves as a PEFT adapter folder; `load_draft` merges it back into a
plain model. Models load through `specdec.loading.load_model`, so every spec it accepts
(HF id, local folder, ``.gguf``, ``zoo:``) works here too.
"""
import copy
import json
import re
from pathlib import Path

import torch

_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A dtype from its name; ``auto`` (or None) means float32 on CPU and bfloat16 on an accelerator."""
    if name is None or name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, str(name).removeprefix("torch."))


def load_model(spec: str, dtype: torch.dtype | None = None, device=None):
    """(model, tokenizer) for any spec that `specdec.loading.load_model` accepts."""
    from specdec.loading import load_model as _load

    return _load(spec, dtype=dtype, device=device)


def draft_from_layers(target, layers) -> torch.nn.Module:
    """A smaller model of the target's class: its embedding, ``layers``, final norm and LM head.

    ``layers`` is a count K (the first K decoder layers) or a list of layer indices.

    Example:
        >>> draft = draft_from_layers(smollm2, 4)   # 30-layer target -> 4-layer draft
        >>> draft.config.num_hidden_layers
        4
    """
    total = target.config.num_hidden_layers
    keep = list(range(layers)) if isinstance(layers, int) else [int(i) for i in layers]
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"draft layers must be distinct indices in [0, {total}), got {layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in target.state_dict().items():
        match = _LAYER_KEY.search(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in new_index:
            state[_LAYER_KEY.sub(f".layers.{new_index[int(match.group(1))]}.", key, count=1)] = value
    draft = type(target)(config).to(torch.float32)
    draft.load_state_dict(state, strict=True)  # copies, so training the draft leaves the target alone
    return draft


def build_draft(draft_cfg, target, device) -> torch.nn.Module:
    """The draft named by ``draft_cfg``: a loaded spec, or built from the target's layers (fp32)."""
    if draft_cfg.get("spec"):
        draft, _ = load_model(str(draft_cfg.spec), dtype=torch.float32, device=device)
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft vocabulary {draft.config.vocab_size} differs from the target's "
                             f"{target.config.vocab_size}; speculative decoding needs a shared tokenizer")
    else:
        draft = draft_from_layers(target, draft_cfg.layers).to(device)
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft


def add_lora(model, lora_cfg):
    """Wrap ``model`` in a PEFT LoRA adapter; only the adapter weights train."""
    from peft import LoraConfig, get_peft_model

    modules = lora_cfg.target_modules
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=modules if isinstance(modules, str) else list(modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_draft(model, tokenizer, path: Path, merge: bool = False, base_spec: str | None = None) -> Path:
    """Save the trained draft to ``path``: an HF folder, or for LoRA a PEFT adapter folder.

    An adapter folder records its base in ``adapter_config.json``: ``base_spec`` when the draft
    was loaded from a spec, otherwise the base weights saved under ``path/base``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_peft(model):
        model.save_pretrained(path)
    elif merge:
        copy.deepcopy(model).merge_and_unload().save_pretrained(path)
    else:
        if base_spec is None:
            copy.deepcopy(model).unload().save_pretrained(path / "base")
            tokenizer.save_pretrained(path / "base")
            base_spec = str((path / "base").resolve())
        model.peft_config["default"].base_model_name_or_path = base_spec
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_draft(path, dtype: torch.dtype | None = None, device=None):
    """(model, tokenizer) from a `save_draft` folder; a PEFT adapter is merged into its base.

    Example:
        >>> model, tokenizer = load_draft("outputs/train/run/draft")
        >>> drafter = specdec.drafters.DraftModel(model, num_tokens=4)
    """
    path = Path(path)
    adapter_config = path / "adapter_config.json"
    if not adapter_config.exists():
        return load_model(str(path), dtype=dtype, device=device)
    from peft import PeftModel

    base = path / "base"
    if not base.is_dir():
        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    model, tokenizer = load_model(str(base), dtype=dtype, device=device)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model.eval(), tokenizer
