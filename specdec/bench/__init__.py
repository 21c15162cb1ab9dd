"""specdec-bench: acceptance and speed of drafters against a same-engine baseline.

Every run decodes the same prompts with the engine and no drafter (the baseline), with the
engine and the configured drafter, and with HF's own greedy ``generate``; it writes JSONL rows,
a markdown table by category and plots. ``collect`` merges a multirun sweep into one table.

    specdec-bench drafter=lookup num_prompts=12
    specdec-bench -m drafter=lookup,draft_model drafter.num_tokens=2,4,8
"""
from specdec.bench.prompts import Prompt, builtin, humaneval, select, specbench
from specdec.bench.report import collect
from specdec.bench.run import CollectCallback, hydra_main, make_row, run_bench

__all__ = ["CollectCallback", "Prompt", "builtin", "collect", "humaneval", "hydra_main", "make_row",
           "run_bench", "select", "specbench"]
