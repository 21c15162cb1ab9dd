"""specdec-bench: acceptance and speed of drafters against a same-engine baseline.

Every run decodes the same prompts with the engine and no drafter (the baseline), with the
engine and each drafter, and with HF's own greedy ``generate``; it writes JSONL rows, a markdown
table by category and plots. ``core`` is the harness (torch and transformers only):

    python -m specdec.bench --drafter lookup:num_tokens=8 --drafter none --num-prompts 12

``specdec-bench`` is the Hydra layer over it; ``collect`` merges a multirun sweep into one table:

    specdec-bench drafter=lookup num_prompts=12
    specdec-bench -m drafter=lookup,draft_model drafter.num_tokens=2,4,8
"""
from specdec.bench.prompts import Prompt, PromptFileError, builtin, humaneval, select, specbench
from specdec.bench.report import collect

_LAZY = {"BenchSettings": "core", "make_row": "rows",
         "CollectCallback": "run", "hydra_main": "run", "run_bench": "run"}


def __getattr__(name):
    """The harness and the Hydra layer load on first use: ``specdec.bench.prompts`` imports
    without torch's model stack, and nothing here imports hydra-core until the Hydra layer is asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"specdec.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'specdec.bench' has no attribute {name!r}")


__all__ = ["BenchSettings", "CollectCallback", "Prompt", "PromptFileError", "builtin", "collect", "humaneval",
           "hydra_main", "make_row", "run_bench", "select", "specbench"]
