"""How many aten ops one decode step issues, by phase (issue 15): a CPU proxy for a step's
kernel launches, which is what a small model's step costs on a launch-bound GPU.

For no drafter, prompt lookup of 8 tokens, an EAGLE head chain of 4, an EAGLE tree (top-4, depth 5,
24 nodes), Medusa (4 heads) and the Kangaroo adapter (a chain of 6), on a tiny llama
(tests/tiny.py) and, with ``--zoo``, SmolLM2-135M: the ops of one greedy (``--sample``: sampled) step after a short
generate call, by phase (``specdec.perf.count_step_ops``), and the drafted step's ops beyond the
plain step's, op by op.

    python scripts/op_count.py                   # tiny llama, 2 layers
    python scripts/op_count.py --zoo --json ops.json
    python scripts/op_count.py --sample --draft-ops   # each drafter's draft phase, op by op
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import specdec
from specdec.drafters import EagleHead, KangarooAdapter, MedusaHeads, PromptLookup
from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel
from specdec.perf import PHASES, count_step_ops


def drafters(model) -> dict:
    """Name -> a function building the drafter (None: plain decoding)."""
    aux = tuple(sorted({0, model.config.num_hidden_layers // 2, model.config.num_hidden_layers - 1}))
    return {"none": lambda: None, "lookup8": lambda: PromptLookup(num_tokens=8),
            "eagle4": lambda: EagleHead(EagleHeadModel.from_target(model, aux), num_tokens=4)}


def head_drafters(model) -> dict:
    """Name -> a function building each draft head (issue 16): the EAGLE tree, Medusa (its default
    template over 4 heads) and the Kangaroo adapter (a chain of 6 after the first half's layers)."""
    aux = tuple(sorted({0, model.config.num_hidden_layers // 2, model.config.num_hidden_layers - 1}))
    exit_layer = max(1, model.config.num_hidden_layers // 2)
    return {"eagle_tree": lambda: EagleHead(EagleHeadModel.from_target(model, aux), num_tokens=5, tree_topk=4,
                                            tree_depth=5, tree_nodes=24),
            "medusa4": lambda: MedusaHeads(MedusaHeadsModel.from_target(model, num_heads=4)),
            "kangaroo6": lambda: KangarooAdapter(KangarooAdapterModel.from_target(model, exit_layer), num_tokens=6)}


def print_draft_ops(rows: dict) -> None:
    """The draft phase of every drafter, op by op (what ``tests/test_head_ops.py`` bounds)."""
    for name, ops in rows.items():
        draft = ops.ops.get("draft")
        if draft:
            print(f"\n{name} draft phase ({draft.total()} ops): "
                  + ", ".join(f"{op.replace('aten.', '')} x{n}" for op, n in draft.most_common()))


def tiny_model():
    import importlib.util  # the tests' tiny-model builder, loaded from its file (no sys.path change)

    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).resolve().parents[1] / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    make_tiny = tiny.make_tiny

    return make_tiny("llama", num_layers=2), torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])


def zoo_model():
    model, tok = specdec.load_model("zoo:smollm2-135m-instruct", dtype=torch.float32)
    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
    return model, tok(text, return_tensors="pt").input_ids


def count(model, ids, drafter, new: int = 8, sample: bool = False):
    spec = specdec.wrap(model, drafter=drafter)
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9) if sample else dict(do_sample=False)
    spec.generate(ids, max_new_tokens=new, pad_token_id=0, eos_token_id=None, **kw)
    return count_step_ops(spec.engine._decoder)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", action="store_true", help="also SmolLM2-135M (zoo:smollm2-135m-instruct)")
    ap.add_argument("--json", type=Path, help="write the counts here")
    ap.add_argument("--sample", action="store_true", help="sampling (T 0.7, top-p 0.9) instead of greedy")
    ap.add_argument("--draft-ops", action="store_true", help="list each drafter's draft-phase ops by name")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = {"tiny-llama-2L": tiny_model}
    if args.zoo:
        models["smollm2-135m"] = zoo_model
    report = {}
    for mname, build in models.items():
        model, ids = build()
        builders = {**drafters(model), **head_drafters(model)}
        rows = {name: count(model, ids, make(), sample=args.sample) for name, make in builders.items()}
        base = rows["none"]
        print(f"\n## {mname} ({base.num_layers} layers): kernel-launching aten ops per step")
        print("| drafter | " + " | ".join(PHASES) + " | total | per layer | syncs |")
        print("|---" * (len(PHASES) + 4) + "|")
        for name, ops in rows.items():
            phases = ops.by_phase()
            syncs = sum(sum(c.values()) for c in ops.syncs.values())
            print(f"| {name} | " + " | ".join(str(phases[p]) for p in PHASES)
                  + f" | {ops.total} | {ops.per_layer():.1f} | {syncs} |")
        for name, ops in rows.items():
            if name == "none":
                continue
            print(f"\n{name} beyond none (draft phase left out):")
            for phase, more in ops.extra_over(base).items():
                if phase != "draft":
                    print(f"  {phase}: " + ", ".join(f"{op.replace('aten.', '')} x{n}" for op, n in more.most_common()))
        if args.draft_ops:
            print_draft_ops(rows)
        report[mname] = {name: {"by_phase": ops.by_phase(), "total": ops.total,
                                "ops": {p: dict(c) for p, c in ops.ops.items()},
                                "syncs": {p: dict(c) for p, c in ops.syncs.items()}} for name, ops in rows.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
