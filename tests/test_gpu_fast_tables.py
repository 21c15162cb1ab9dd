"""scripts/gpu_fast.py --tables: one pooled table over the rows of several (possibly cut-short) runs.

The H100 runs are split by category to fit a device call's time limit; the table in the notes is
then this merge, so its pooling must be the same as a single run's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_fast  # noqa: E402


def row(category, qid, hf, compiled, lookup, tau, new=100):
    steps = round(new / tau)
    return {"category": category, "question_id": qid, "turn": 1, "prompt_tokens": 50,
            "hf": {"tok_s": hf, "new": new}, "hf lookup": {"tok_s": hf, "new": new},
            "compiled": {"tok_s": compiled, "tau": 1.0, "steps": new, "ms_per_step": 1e3 / compiled, "new": new},
            "compiled lookup": {"tok_s": lookup, "tau": tau, "steps": steps, "ms_per_step": 1e3 * new / lookup / steps,
                                "new": new}}


def test_tables_pool_rows_from_a_report_and_a_log(tmp_path):
    a = row("coding", 1, hf=20.0, compiled=400.0, lookup=500.0, tau=2.0)
    b = row("editing", 2, hf=40.0, compiled=400.0, lookup=1000.0, tau=4.0)
    c = row("editing", 3, hf=10.0, compiled=100.0, lookup=200.0, tau=1.0, new=50)
    # A run cut short before its table: its --out file says partial; another left only its log.
    (tmp_path / "part.json").write_text(json.dumps({"model": "m", "rows": [a], "partial": True}))
    log = "Loading weights: 100%\n" + json.dumps(b) + "\nsome warning\n" + json.dumps(c) + "\n"
    (tmp_path / "run.log").write_text(log)
    text = gpu_fast.tables([tmp_path / "part.json", tmp_path / "run.log"])
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert set(lines) >= {"coding 1 t1", "editing 2 t1", "editing 3 t1", "**editing**", "**coding**", "**all**"}
    # Pooled = total tokens over total time (not a mean of rates, which would give 250):
    # editing compiled = 150 / (100/400 + 50/100) = 200 tok/s, HF = 150 / (100/40 + 50/10) = 20
    # tok/s, so compiled × HF = 10.00.
    cells = lines["**editing**"].strip("| ").split(" | ")
    assert cells[3] == "200.0" and cells[1] == "20.0" and cells[5] == "10.00"
    assert gpu_fast.pooled([b, c], "compiled") == pytest.approx(200.0)


def test_tables_refuse_runs_of_different_methods(tmp_path):
    a = row("coding", 1, hf=20.0, compiled=400.0, lookup=500.0, tau=2.0)
    b = row("editing", 2, hf=40.0, compiled=400.0, lookup=1000.0, tau=4.0)
    del b["compiled lookup"]
    (tmp_path / "r.json").write_text(json.dumps({"rows": [a, b]}))
    with pytest.raises(SystemExit, match="editing 2 t1.*compiled lookup"):
        gpu_fast.tables([tmp_path / "r.json"])
    (tmp_path / "empty.log").write_text("nothing measured\n")
    with pytest.raises(SystemExit, match="no rows"):
        gpu_fast.tables([tmp_path / "empty.log"])


@pytest.mark.zoo
def test_the_harness_runs_every_method_on_the_cpu(monkeypatch):
    """A smoke run of ``per_prompt`` on SmolLM2 (CPU, no graphs): every method the GPU run times
    measures its first call and repeats, and the greedy ones equal the baseline's tokens in fp32."""
    import argparse

    import specdec

    import time

    monkeypatch.setattr(gpu_fast, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_fast, "timed", lambda fn: (lambda t: (fn(), time.perf_counter() - t))(time.perf_counter()))
    real = specdec.wrap
    monkeypatch.setattr(gpu_fast.specdec, "wrap", lambda model, **kw: real(
        model, **{k: v for k, v in kw.items() if k not in ("cuda_graphs", "compile")}))
    model, tok = specdec.load_model("zoo:smollm2-135m-instruct", dtype="float32", device="cpu")
    args = argparse.Namespace(chunk_steps=1, no_compile=False, compile_options=None, no_graphed=True,
                              sync_baseline=False, min_tau=None, sampling=True, exit_layer=20, reps=1,
                              categories=["summarization"], per_category=1, max_new_tokens=6, hf=["hf"])
    rows, profile, floor, names, hf_names, base = gpu_fast.per_prompt(args, model, tok, None)
    assert hf_names == ["hf"] and base == "compiled"
    assert set(names) == {"compiled", "compiled lookup", "compiled sampled", "lookup sampled", "layerskip", "kangaroo"}
    for r in rows:
        for n in names:
            assert r[n]["new"] == 6 and r[n]["first_s"] > 0 and r[n]["new_compiles"] == 0
            if not n.endswith("sampled"):
                assert r[n]["tokens"] == r["compiled"]["tokens"] == r["hf"]["tokens"], n
    assert "sampled × greedy" in gpu_fast.table(rows, hf_names + names, base)
