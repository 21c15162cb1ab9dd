"""Draft-phase op counts of the model drafters against their layer-count bounds (issue 15).

A self-draft (LayerSkip, Kangaroo halting, DynamicExit) through E of the target's L layers should
cost about E/L of a plain step per drafted token; a draft model, about one of its own plain steps
per forward. On a launch-bound GPU a step costs about one launch per aten op, so the op count of
the draft phase (``specdec.perf.count_step_ops``) against

- self-drafts: ``(E / L) × plain-step ops × γ``,
- ``DraftModel``: ``γ × the draft model's own plain-step ops``,

is a CPU proxy for the issue's device-time bounds. On the tiny llama (2 layers, tests/tiny.py) the
self-drafts exit after layer 1 and the draft model is a 1-layer tiny llama; with ``--zoo``,
SmolLM2-135M exits after layer 22 of 30 and its draft model is a random 2-layer model of SmolLM2's
shape and vocabulary. γ = 4 throughout (``--tokens``).

    python scripts/draft_ops.py                  # tiny llama
    python scripts/draft_ops.py --zoo --sample --json draft_ops.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from specdec.drafters import DraftModel, DynamicExit, LayerSkip, make_drafter


def _op_count():
    """scripts/op_count.py, loaded from its file (its models and its one-step counter)."""
    spec = importlib.util.spec_from_file_location("op_count", Path(__file__).with_name("op_count.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def confident(drafter: DynamicExit) -> DynamicExit:
    """DEL as if every shadow token so far had matched: it then drafts its longest chain, the
    most expensive step it can take (the one to bound)."""
    drafter.hits = list(drafter.seen)
    return drafter


def shallow_copy_of(model, layers: int = 2):
    """A random-init draft of the target's shape and vocabulary with ``layers`` layers."""
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict({**model.config.to_dict(), "num_hidden_layers": layers})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_draft():
    """The tiny target's draft: a 1-layer tiny llama (tests/tiny.py) of the same vocabulary."""
    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).resolve().parents[1] / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.make_tiny("llama", num_layers=1, seed=1)


def model_drafters(model, draft, tokens: int) -> dict:
    """Name -> (a function building the drafter, its exit layer E or None for a draft model)."""
    n = model.config.num_hidden_layers
    exit_layer = max(1, round(n * 22 / 30)) if n > 2 else 1
    return {
        f"layerskip E{exit_layer}": (lambda: LayerSkip(exit_layer=exit_layer, num_tokens=tokens), exit_layer),
        f"kangaroo E{exit_layer}": (lambda: make_drafter("kangaroo", exit_layer=exit_layer, num_tokens=tokens,
                                                         stop_threshold=0.6), exit_layer),
        f"del E{exit_layer}": (lambda: DynamicExit(num_tokens=tokens, exit_layers=[exit_layer]), exit_layer),
        "draft_model": (lambda: DraftModel(draft, num_tokens=tokens), None),
    }


def draft_rows(model, ids, draft, tokens: int = 4, sample: bool = False) -> dict:
    """Per drafter: its draft-phase ops, the bound, and the plain steps the bound is made of."""
    oc = _op_count()
    plain = oc.count(model, ids, None, sample=sample)
    draft_plain = oc.count(draft, ids, None, sample=sample)
    rows = {}
    for name, (make, exit_layer) in model_drafters(model, draft, tokens).items():
        drafter = make()
        spec = _generated(model, drafter, ids, sample)
        if isinstance(drafter, DynamicExit):
            confident(drafter)
        ops = oc.count_step_ops(spec.engine._decoder)
        if exit_layer is None:
            bound = tokens * draft_plain.total
        else:
            bound = exit_layer / plain.num_layers * plain.total * tokens
        drafted = ops.by_phase()["draft"]
        rows[name] = {"draft_ops": drafted, "bound": round(bound, 1), "ratio": round(drafted / bound, 3),
                      "per_token": round(drafted / tokens, 1), "plain_step": plain.total,
                      "draft_plain_step": draft_plain.total if exit_layer is None else None,
                      "syncs": {p: dict(c) for p, c in ops.syncs.items()}}
    return rows


def _generated(model, drafter, ids, sample: bool):
    """The wrapper after a short generate call (its decoder holds a live state to count a step of)."""
    import specdec

    spec = specdec.wrap(model, drafter=drafter)
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9) if sample else dict(do_sample=False)
    spec.generate(ids, max_new_tokens=8, pad_token_id=0, eos_token_id=None, **kw)
    return spec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", action="store_true", help="also SmolLM2-135M (zoo:smollm2-135m-instruct)")
    ap.add_argument("--sample", action="store_true", help="sampling (T 0.7, top-p 0.9) instead of greedy")
    ap.add_argument("--tokens", type=int, default=4, help="draft length γ (default 4)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    oc = _op_count()
    models = {"tiny-llama-2L": (oc.tiny_model, True)}
    if args.zoo:
        models["smollm2-135m"] = (oc.zoo_model, False)
    report = {}
    for mname, (build, tiny) in models.items():
        model, ids = build()
        draft = tiny_draft() if tiny else shallow_copy_of(model)
        rows = draft_rows(model, ids, draft, args.tokens, args.sample)
        plain = next(iter(rows.values()))["plain_step"]
        print(f"\n## {mname} ({model.config.num_hidden_layers} layers, plain step {plain} ops, γ {args.tokens}, "
              f"{'sampled' if args.sample else 'greedy'}): draft-phase ops against the bound")
        print("| drafter | draft ops | bound | × bound | per drafted token | syncs |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            syncs = sum(sum(c.values()) for c in r["syncs"].values())
            print(f"| {name} | {r['draft_ops']} | {r['bound']} | {r['ratio']:.2f} | {r['per_token']} | {syncs} |")
        report[mname] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
