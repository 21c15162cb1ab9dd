"""specdec-bench: acceptance and speed of drafters against a same-engine baseline.

Every run decodes the same prompts with the engine and no drafter (the baseline), with the
engine and the configured drafter, and with HF's own greedy ``generate``; it writes JSONL rows,
a markdown table by category and plots. ``collect`` merges a multirun sweep into one table.

    specdec-bench drafter=lookup num_prompts=12
    specdec-bench -m drafter=lookup,draft_model drafter.num_tokens=2,4,8
"""
from specdec.bench.prompts import Prompt, builtin, humaneval, select, specbench
from specdec.bench.report import collect

_RUN = ("CollectCallback", "hydra_main", "make_row", "run_bench")


def __getattr__(name):
    """The Hydra runner loads on first use, so ``specdec.bench.measure`` and the GPU scripts
    import without hydra-core (the GPU machine has none)."""
    if name in _RUN:
        from specdec.bench import run

        return getattr(run, name)
    raise AttributeError(f"module 'specdec.bench' has no attribute {name!r}")

__all__ = ["CollectCallback", "Prompt", "builtin", "collect", "humaneval", "hydra_main", "make_row",
           "run_bench", "select", "specbench"]
