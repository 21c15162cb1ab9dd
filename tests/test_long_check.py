"""The long-context checks (specdec.bench.long_check) over literal rows: an unexplained greedy
divergence and a peak over its budget fail, a near-tie and a peak under budget pass, needles are
found only where the passphrase is; and the report's memory line says within or over."""
from specdec.bench.long_check import check, needle_found
from specdec.bench.long_prompts import needle_answer, prompt_seed
from specdec.bench.report import aggregate, memory_line


def row(qid="long_2048_0", category="long_2048", matches=True, divergence=None, peak=None, budget=None,
        out=(1, 2), base=(1, 2)):
    return {"drafter": "rapid", "params": {"num_tokens": 4}, "batch_size": 1, "memory_budget": budget,
            "mode": "greedy", "category": category, "question_id": qid, "matches_baseline": matches,
            "first_divergence": None if matches else {"turn": 0, "index": 1}, "divergence": divergence,
            "peak_extra_bytes": peak, "output_ids": [list(out)], "baseline": {"output_ids": [list(base)]}}


def test_divergences_fail_unless_near_ties():
    lines, failures = check([row(), row(qid="long_2048_1", matches=False, divergence={"near_tie": True})])
    assert failures == [] and "| 1/2 | 0 |" in lines[2]
    _, failures = check([row(matches=False, divergence={"near_tie": False})])
    assert len(failures) == 1 and "not at a near-tie" in failures[0]
    _, failures = check([row(matches=False, divergence=None)])  # divergence not measured: not explained
    assert len(failures) == 1


def test_peak_over_budget_fails():
    assert check([row(peak=10 << 20, budget=16 << 20)])[1] == []
    _, failures = check([row(peak=17 << 20, budget=16 << 20)])
    assert len(failures) == 1 and "over memory_budget" in failures[0]


def test_needle_found_reads_the_passphrase_of_the_prompt_seed():
    answer = needle_answer(prompt_seed(0, 2048, 1))
    text = {1: f"It is {answer}.", 2: "I do not know."}
    r = row(qid="needle_2048_1", category="needle_2048", out=(1,), base=(2,))
    assert needle_found(r, lambda ids: text[ids[0]], seed=0) == (True, False)
    assert needle_found(r, lambda ids: text[ids[0]], seed=1) == (False, False)  # another seed, another phrase
    assert needle_found(row(), lambda ids: "", seed=0) is None


def test_memory_line_compares_the_peak_with_the_budget():
    rows = [{"accept_hist": [0, 1], "draft_tokens": 0, "new_tokens": 1, "wall_time": 1.0, "steps": 1, "times": {},
             "matches_baseline": True, "peak_bytes": p + (3 << 20), "peak_extra_bytes": p,
             "baseline": {"new_tokens": 1, "wall_time": 1.0, "steps": 1, "times": {}, "peak_bytes": 3 << 20}}
            for p in (1 << 20, 5 << 20)]
    agg = aggregate(rows)
    assert agg["peak_extra_bytes"] == 5 << 20 and agg["baseline_peak_bytes"] == 3 << 20
    assert "within" in memory_line(agg, 8 << 20) and "**over**" in memory_line(agg, 4 << 20)
    cpu = aggregate([dict(r, peak_bytes=None, peak_extra_bytes=None) for r in rows])
    assert memory_line(cpu, None) is None
