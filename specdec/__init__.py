"""specdec: speculative and early-exit decoding for Hugging Face causal language models.

Public API: ``wrap`` (speculative ``generate`` over an HF model) and ``load_model`` (hub ids,
folders, GGUF files and the offline ``zoo:`` models).
"""
from specdec.api import SpecDecoder, SpecGenerateOutput, UnsupportedGenerationOption, wrap
from specdec.stats import SpecStats

__version__ = "0.1.0"


def load_model(spec, dtype=None, device=None):
    """Load ``(model, tokenizer)`` from an HF id, a folder, a ``.gguf`` file or ``zoo:NAME``."""
    from specdec.loading import load_model as _load

    return _load(spec, dtype=dtype, device=device)


__all__ = ["SpecDecoder", "SpecGenerateOutput", "SpecStats", "UnsupportedGenerationOption", "load_model", "wrap"]
