"""specdec-bench: prompt sources, row arithmetic, and a CPU sweep through the real engine."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module
from tiny import make_tiny
from transformers import AutoTokenizer

from specdec.bench import builtin, humaneval, hydra_main, run_bench, select, specbench
from specdec.bench.measure import Decoded, Generated, decode, divergence_gap, first_divergence, resolution
from specdec.bench.prompts import Prompt, read_jsonl, render
from specdec.bench.report import (aggregate, below_baseline_line, by_turn, collect, divergence_lines, format_params,
                                  run_markdown, sweep_markdown)
from specdec.loading import dense_zoo_dir

CATEGORIES = {"coding", "editing", "summarization", "math", "qa", "chat"}
ROW_KEYS = {"memory", "memory_budget", "peak_bytes", "peak_extra_bytes", "model", "dtype", "device", "drafter", "params", "batch_size", "max_new_tokens", "max_draft_batch",
            "min_tau", "mode", "temperature", "top_p", "top_k", "question_id", "category", "num_turns", "prompt_tokens",
            "new_tokens", "steps", "tau", "draft_tokens", "acceptance_rate", "accept_hist", "wall_time",
            "tokens_per_s", "times", "lossless", "baseline", "hf", "speedup", "speedup_hf",
            "matches_baseline", "first_divergence", "turn_new_tokens", "turn_steps", "turn_tau", "turn_wall_time",
            "turn_tokens_per_s", "turn_speedup", "undrafted_steps", "divergence", "hf_lookup", "hf_assisted",
            "speedup_hf_lookup", "speedup_hf_assisted", "hf_matches_baseline", "output_ids", "batch_index",
            "first_call", "captures", "idle_steps"}
TURN_KEYS = {"turn_new_tokens", "turn_steps", "turn_tau", "turn_wall_time", "turn_tokens_per_s", "turn_speedup"}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(dense_zoo_dir("zoo:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", vocab_size=49152).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- prompt sources

def test_builtin_set_covers_every_category_in_specbench_format():
    prompts = builtin()
    assert len(prompts) >= 48
    assert len({p.question_id for p in prompts}) == len(prompts)
    assert {p.category for p in prompts} == CATEGORIES
    for category in CATEGORIES:
        assert sum(p.category == category for p in prompts) >= 8
    for p in prompts:
        if p.category == "editing":   # a later turn revises the earlier answer
            assert len(p.turns) >= 2
        if p.category == "summarization":
            assert "Passage:\n" in p.turns[0] and len(p.turns[0]) > 600
        if p.category == "qa":
            assert "Context:\n" in p.turns[0] and "Question:" in p.turns[0]


def test_select_is_round_robin_over_categories_and_names_unknown_ones():
    prompts = builtin()
    assert {p.category for p in select(prompts, num_prompts=6)} == CATEGORIES
    picked = select(prompts, num_prompts=3, categories=["editing", "qa"])
    assert [p.category for p in picked] == ["editing", "qa", "editing"]
    with pytest.raises(ValueError, match="poetry"):
        select(prompts, categories=["poetry"])


def test_specbench_file_keeps_turns_and_rejects_missing_keys(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Write.", "Shorter."]})
                    + "\n\n" + json.dumps({"question_id": 82, "category": "math", "turns": ["1+1?"]}) + "\n")
    assert specbench(str(path)) == [Prompt(81, "writing", ("Write.", "Shorter.")), Prompt(82, "math", ("1+1?",))]
    path.write_text(json.dumps({"question_id": 1, "turns": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="category"):
        read_jsonl(path)


def test_humaneval_has_all_164_problems():
    prompts = humaneval()
    assert len(prompts) == 164
    assert prompts[0].question_id == "HumanEval/0" and "def has_close_elements" in prompts[0].turns[0]


def test_later_turns_see_earlier_answers(smollm2_tokenizer):
    text = render(smollm2_tokenizer, ["Write a haiku.", "Make it about rain."], ["Old pond, a frog jumps"])
    assert text.index("Write a haiku.") < text.index("Old pond, a frog jumps") < text.index("Make it about rain.")
    assert text.rstrip().endswith("assistant")   # ready for the model's next answer

    class Plain:   # a tokenizer without a chat template
        chat_template = None
    assert render(Plain(), ["Hi", "Again"], ["Hello"]) == "User: Hi\nAssistant: Hello\nUser: Again\nAssistant:"


# ---------------------------------------------------------------- row arithmetic

def test_format_params_names_nested_drafters_by_class():
    assert format_params({}) == ""
    assert format_params({"gamma": 3, "fallback": {"_target_": "specdec.drafters.PromptLookup", "num_tokens": 4},
                          "memory": False}) == "gamma=3, fallback=PromptLookup(num_tokens=4), memory=False"
    assert format_params({"fallback": None}) == "fallback=None"


def test_first_divergence():
    assert first_divergence([[5, 6, 7]], [[5, 6, 7]]) is None
    assert first_divergence([[5, 6, 7]], [[5, 6, 9]]) == {"turn": 0, "index": 2}     # mismatch at 2
    assert first_divergence([[5, 6]], [[5, 6, 2]]) == {"turn": 0, "index": 2}        # one stopped early
    assert first_divergence([[1], [4, 5]], [[1], [3, 5]]) == {"turn": 1, "index": 0}


def test_aggregate_pools_tokens_and_time():
    def row(new, wall, hist, drafts, base_wall):
        return {"new_tokens": new, "wall_time": wall, "accept_hist": hist, "draft_tokens": drafts,
                "steps": sum(hist), "times": {}, "matches_baseline": True,
                "baseline": {"new_tokens": new, "wall_time": base_wall, "steps": new, "times": {}},
                "hf": {"new_tokens": new, "wall_time": 2 * base_wall}}
    # Row 1: 4 steps emitting 1,1,3,3 tokens; row 2: 2 steps emitting 2,2. 12 tokens in 6 steps.
    agg = aggregate([row(8, 1.0, [0, 2, 0, 2], 12, 2.0), row(4, 1.0, [0, 0, 2], 6, 2.0)])
    assert agg["tau"] == pytest.approx(12 / 6)
    assert agg["alpha"] == pytest.approx((12 - 6) / 18)   # accepted drafts over offered drafts
    assert agg["tokens_per_s"] == pytest.approx(6.0)
    assert agg["speedup"] == pytest.approx(2.0) and agg["speedup_hf"] == pytest.approx(4.0)
    assert agg["matches_baseline"] == "2/2"


def test_by_turn_pools_each_turn_over_the_prompts_that_have_it():
    def row(new, steps, wall, base_wall):
        return {"turn_new_tokens": new, "turn_steps": steps, "turn_wall_time": wall,
                "baseline": {"turn_new_tokens": new, "turn_wall_time": base_wall}}
    # Two prompts answer turn 1 in 12 tokens / 12 steps; only the first has a turn 2: 8 tokens in 2 steps.
    turns = by_turn([row([8, 8], [8, 2], [1.0, 0.5], [1.0, 2.0]), row([4], [4], [1.0], [1.0])])
    assert [(t["turn"], t["prompts"]) for t in turns] == [(1, 2), (2, 1)]
    assert turns[0]["tau"] == pytest.approx(1.0) and turns[1]["tau"] == pytest.approx(4.0)
    assert turns[0]["speedup"] == pytest.approx(1.0) and turns[1]["speedup"] == pytest.approx(4.0)   # 16 vs 4 tok/s


def test_undrafted_steps_are_each_rows_own(smollm2_tokenizer):
    """Each row counts the undrafted steps the engine attributes to it (``undrafted_by_row``), not
    the call's total: the policies pause drafting anywhere in a call, not only at its start."""
    calls = [SimpleNamespace(accepted_lengths=[[1, 1, 1], [3, 1, 1, 1, 3, 1, 3]], new_tokens=[3, 13],
                             proposed=[[0, 0, 0], [2, 0, 0, 0, 2, 0, 2]], undrafted_steps=4,
                             undrafted_by_row=[3, 4], idle_steps=1, times={}, lossless=True),
             SimpleNamespace(accepted_lengths=[[2, 2]], new_tokens=[4], proposed=[[2, 2]], undrafted_steps=0,
                             undrafted_by_row=[0], idle_steps=2, times={}, lossless=True)]   # turn 2: alone

    def method(input_ids, attention_mask):
        stats = calls.pop(0)
        width = max(stats.new_tokens)
        new = torch.tensor([[7] * n + [0] * (width - n) for n in stats.new_tokens])
        return Generated(torch.cat([input_ids, new], dim=1), stats.new_tokens, stats)

    prompts = [Prompt(1, "qa", ("Hi.",)), Prompt(2, "editing", ("Write.", "Shorter."))]
    short, long = decode(method, prompts, smollm2_tokenizer, torch.device("cpu"))
    assert (short.steps, short.undrafted_steps) == (3, 3)
    assert (long.turn_steps, long.undrafted_steps) == ([7, 2], 4)
    assert long.new_tokens == 17 and long.draft_tokens == 10
    assert (short.idle_steps, long.idle_steps) == (0.5, 2.5)   # a call's idle steps, shared by its rows


def test_resolution_is_one_ulp_of_the_dtype():
    assert resolution(1.0, torch.bfloat16) == 2 ** -7
    assert resolution(3.0, torch.bfloat16) == 2 ** -6 and resolution(-3.0, torch.bfloat16) == 2 ** -6
    assert resolution(20.0, torch.float16) == 2 ** -6
    assert resolution(1.0, torch.float32) == 2 ** -23
    x = torch.tensor(13.7, dtype=torch.bfloat16)   # the next bf16 value above x is one ulp away
    assert float(torch.nextafter(x, torch.tensor(99.0, dtype=torch.bfloat16)) - x) == resolution(13.7, torch.bfloat16)


def test_divergence_gap_reads_the_targets_logits_where_outputs_part(smollm2_tokenizer):
    torch.manual_seed(0)
    model = make_tiny("llama", vocab_size=49152, hidden=32, num_layers=1, init_range=0.02)
    tok = smollm2_tokenizer
    prompt = Prompt("q1", "chat", ["Say hi."])
    text = render(tok, prompt.turns, [])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    base_ids = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids + base_ids[:2]])).logits[0, -1]
    top = logits.topk(2)
    second = int(top.indices[1])
    base = Decoded(output_ids=[base_ids], answers=[tok.decode(base_ids)])
    drafted = Decoded(output_ids=[base_ids[:2] + [second, 7]], answers=[""])   # parts at index 2, to the runner-up
    where = first_divergence(drafted.output_ids, base.output_ids)
    d = divergence_gap(model, tok, prompt, base, drafted, where, torch.device("cpu"))
    gap = float(top.values[0] - top.values[1])
    assert where == {"turn": 0, "index": 2} and d["index"] == 2
    assert d["gap"] == pytest.approx(gap) and d["ulp"] == resolution(float(top.values[0]), torch.float32)
    assert d["gap_ulps"] == pytest.approx(gap / d["ulp"])
    assert d["baseline_token"] == base_ids[2] and d["drafter_token"] == second and d["top2"]
    assert d["parted_ulps"] == pytest.approx(gap / d["ulp"])   # the runner-up is the lower of the two
    assert d["near_tie"] == (gap / d["ulp"] <= 2)   # fp32 ulps are tiny: a random model's gap is many of them
    assert not d["near_tie"]
    worst = int(logits.argmin())
    other = Decoded(output_ids=[base_ids[:2] + [worst]], answers=[""])   # not a top-2 token
    d = divergence_gap(model, tok, prompt, base, other, where, torch.device("cpu"))
    assert not d["top2"] and not d["near_tie"]
    assert d["parted_ulps"] == pytest.approx(float(top.values[0] - logits[worst]) / d["ulp"])
    stopped = Decoded(output_ids=[base_ids[:2]], answers=[""])   # stopped before the index: only the baseline's
    assert divergence_gap(model, tok, prompt, base, stopped, where, torch.device("cpu"))["parted_ulps"] == 0.0
    model.to(torch.bfloat16)   # in bf16 the gap is measured in bf16 ulps of the top logit
    d = divergence_gap(model, tok, prompt, base, drafted, where, torch.device("cpu"))
    with torch.no_grad():
        top1 = float(model(torch.tensor([ids + base_ids[:2]])).logits[0, -1].float().max())
    assert d["ulp"] == resolution(top1, torch.bfloat16) and d["gap_ulps"] == pytest.approx(d["gap"] / d["ulp"])


def test_divergence_section_flags_anything_but_a_near_tie():
    def row(q, near):
        return {"question_id": q, "category": "coding", "first_divergence": {"turn": 0, "index": 5},
                "divergence": {"turn": 0, "index": 5, "gap": 0.0625, "ulp": 0.0625, "gap_ulps": 1.0,
                               "top2": True, "parted_ulps": 1.0 if near else 9.0, "near_tie": near}}
    assert "none" in divergence_lines([{"first_divergence": None}])[0]
    ok = "\n".join(divergence_lines([row("a", True)]))
    assert "rounding, not a bug" in ok and "NOT a near-tie" not in ok
    bad = "\n".join(divergence_lines([row("a", True), row("b", False)]))
    assert "NOT a near-tie: investigate (a bug), questions b" in bad and "| 9.00 | **NO** |" in bad


def test_sweep_table_marks_runs_below_their_baseline():
    def run(batch, speedup, policy=None, undrafted=0, lookup=None):
        agg = {"tau": 1.5, "alpha": 0.4, "tokens_per_s": 10 * speedup, "baseline_tokens_per_s": 10.0,
               "speedup": speedup, "speedup_hf": 2.0, "speedup_hf_lookup": lookup, "speedup_hf_assisted": None,
               "matches_baseline": "2/2", "steps": 40, "undrafted_steps": undrafted}
        return {"model": "m", "dtype": "float32", "device": "cpu", "drafter": "lookup", "params": {"num_tokens": 4},
                "batch_size": batch, "max_draft_batch": policy, "max_new_tokens": 8, "mode": "greedy",
                "temperature": None, "top_p": None, "top_k": None, "categories": {"coding": agg}} | agg
    table = sweep_markdown([run(1, 1.4), run(16, 0.8)])
    fast, slow = [line for line in table.splitlines() if line.startswith("| lookup")]
    assert "| 1 |" in fast and "**below**" not in fast
    assert "| 16 |" in slow and "0.80 **below**" in slow and "| 8.0 | 10.0 |" in slow   # both throughputs shown
    assert "1 run(s) slower than their no-drafter baseline:** lookup num_tokens=4 greedy batch_size=16 (×0.80)" in table
    assert "undrafted" not in table and "HF lookup" not in table   # nothing measured them

    # A batch sweep with the policy: both varying settings get a column, and the undrafted share shows.
    table = sweep_markdown([run(16, 0.8), run(16, 1.1, policy=4, undrafted=30, lookup=1.2)])
    header = next(line for line in table.splitlines() if line.startswith("| drafter"))
    assert "| max_draft_batch |" in header and "| × HF lookup | undrafted |" in header
    assert "batch_size 16" in table.splitlines()[2]   # the same for both runs: above the table
    policy = next(line for line in table.splitlines() if "| 4 |" in line)
    assert "| 1.10 | 2.00 | 1.20 | 75% |" in policy and "below" not in policy
    assert len(table.splitlines()[4].split("|")) == len(policy.split("|"))   # every line has every column


def _row(mode="greedy", drafter="lookup", batch=1, policy=None, wall=1.0, base_wall=1.0, undrafted=0, hf_same=None):
    """A row as ``make_row`` writes it, with 8 tokens in 4 steps (τ 2) and a baseline of 8 tokens."""
    timing = {"new_tokens": 8, "steps": 8, "wall_time": base_wall, "times": {}, "turn_new_tokens": [8],
              "turn_wall_time": [base_wall]}
    return {"model": "m", "dtype": "bfloat16", "device": "cpu", "drafter": drafter, "params": {},
            "batch_size": batch, "max_draft_batch": policy, "max_new_tokens": 8, "mode": mode, "temperature": None,
            "top_p": None, "top_k": None, "question_id": 1, "category": "coding", "num_turns": 1,
            "new_tokens": 8, "steps": 4, "accept_hist": [0, 2, 0, 2], "draft_tokens": 8, "wall_time": wall,
            "times": {}, "undrafted_steps": undrafted, "turn_new_tokens": [8], "turn_steps": [4],
            "turn_wall_time": [wall], "baseline": timing, "hf": None, "hf_lookup": None, "hf_assisted": None,
            "matches_baseline": True, "first_divergence": None, "divergence": None, "hf_matches_baseline": hf_same}


def test_run_summary_warns_when_drafting_is_slower_than_the_baseline():
    slow = run_markdown([_row(batch=16, wall=1.25, base_wall=1.0, policy=None)], "t")   # 6.4 vs 8.0 tok/s
    assert "**Drafting is slower than the baseline here (×0.80)**; consider max_draft_batch=8" in slow
    assert "`-m max_draft_batch=8,4,2,1`" in slow
    fast = run_markdown([_row(batch=16, wall=0.5, base_wall=1.0)], "t")
    assert "slower than the baseline" not in fast
    alone = run_markdown([_row(drafter="none", wall=1.25, base_wall=1.0)], "t")   # no drafter: noise, not a loss
    assert "slower than the baseline" not in alone
    # At batch 1, or with the policy already at 1, there is no batch to cut: draft less instead.
    assert below_baseline_line(0.9, 1, None).endswith("consider fewer draft tokens, or none.")
    assert below_baseline_line(0.9, 16, 1).endswith("consider fewer draft tokens, or none.")
    assert "max_draft_batch=2 " in below_baseline_line(0.9, 16, 4)   # halves the policy in force
    policy = run_markdown([_row(batch=4, policy=2, undrafted=3), _row(batch=4, policy=2, undrafted=1)], "t")
    assert "Draft policy `max_draft_batch=2`: 4 of 8 row-steps ran without a draft." in policy
    same = run_markdown([_row(hf_same={"hf": True, "hf_lookup": True}),
                         _row(hf_same={"hf": False, "hf_lookup": True})], "t")
    assert "HF greedy outputs equal to the baseline's: HF greedy 1/2, HF lookup 2/2" in same


# ---------------------------------------------------------------- the CLI on CPU

def test_sweep_on_tiny_model_writes_rows_tables_and_plots(tiny_folder, tmp_path, monkeypatch):
    """The CI sweep: 2 lookup settings x 2 prompts, greedy and sampled, with baseline and HF."""
    sweep = tmp_path / "multirun"
    monkeypatch.setattr(sys, "argv", [
        "specdec-bench", "-m", "drafter=lookup", "drafter.num_tokens=2,4", f"model.spec={tiny_folder}",
        "num_prompts=2", "max_new_tokens=8", "warmup=0", "threads=1", "progress=false",
        f"hydra.sweep.dir={sweep}"])
    hydra_main()

    for job in ("0", "1"):
        rows = [json.loads(line) for line in (sweep / job / "rows.jsonl").read_text().splitlines()]
        assert [(r["mode"], r["category"]) for r in rows] == [
            ("greedy", "coding"), ("greedy", "editing"), ("sample", "coding"), ("sample", "editing")]
        for r in rows:
            assert set(r) == ROW_KEYS
            assert r["baseline"]["new_tokens"] > 0 and r["baseline"]["tokens_per_s"] > 0   # the baseline ran
            assert r["hf"]["new_tokens"] > 0 and r["speedup_hf"] > 0
            assert r["new_tokens"] == sum(k * n for k, n in enumerate(r["accept_hist"]))
            assert r["lossless"] is True
            assert all(len(r[k]) == r["num_turns"] for k in TURN_KEYS)   # one entry per turn
            assert sum(r["turn_new_tokens"]) == r["new_tokens"] and sum(r["turn_steps"]) == r["steps"]
            assert r["baseline"]["turn_new_tokens"] and len(r["baseline"]["turn_tokens_per_s"]) == r["num_turns"]
        editing = rows[1]
        assert editing["num_turns"] == 2 and len(editing["prompt_tokens"]) == 2
        # fp32: speculative greedy output equals the same engine's no-drafter output, token for token.
        assert all(r["matches_baseline"] and r["first_divergence"] is None for r in rows[:2])
        assert all(r["matches_baseline"] is None for r in rows[2:])
        summary_md = (sweep / job / "summary.md").read_text()
        assert "| **all** |" in summary_md
        assert "By turn" in summary_md and "| 2 | 1 |" in summary_md   # turn 2 of the editing prompt
        assert (sweep / job / "accepted_lengths.png").stat().st_size > 0
        assert list((sweep / job / "wandb").glob("offline-run-*"))

    summary = (sweep / "summary.md").read_text()
    assert "num_tokens=2" in summary and "num_tokens=4" in summary
    assert (sweep / "sweep.png").stat().st_size > 0
    runs = collect(sweep)   # re-collecting gives the same four runs: 2 settings x 2 modes
    assert sorted((r["params"]["num_tokens"], r["mode"]) for r in runs) == [
        (2, "greedy"), (2, "sample"), (4, "greedy"), (4, "sample")]


def test_hf_lookup_and_assisted_references_and_the_batch_policy(tiny_folder, tmp_path, monkeypatch):
    def bench(out, *overrides):
        with initialize_config_module("specdec.conf", version_base=None):
            cfg = compose("bench", overrides=["drafter=lookup", f"model.spec={tiny_folder}", "num_prompts=2",
                                              "max_new_tokens=8", "modes=[greedy]", "logger=none", "warmup=0",
                                              "threads=1", "progress=false", "hf_lookup=3",
                                              f"hf_assistant={tiny_folder}", *overrides])
        run_bench(cfg, out)
        return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()], (out / "summary.md").read_text()

    rows, summary = bench(tmp_path / "one")
    for r in rows:
        for name in ("hf", "hf_lookup", "hf_assisted"):   # each HF method ran and was timed
            assert r[name]["new_tokens"] > 0 and r[f"speedup_{name}"] > 0
        assert r["speedup_hf_lookup"] == pytest.approx(r["tokens_per_s"] / r["hf_lookup"]["tokens_per_s"])
        assert r["undrafted_steps"] == 0 and r["max_draft_batch"] is None
        # fp32: HF's greedy methods give the engine baseline's tokens, prompt lookup and assisted included
        assert r["hf_matches_baseline"] == {"hf": True, "hf_lookup": True, "hf_assisted": True}
    assert "| × HF lookup | × HF assisted |" in summary
    assert "Divergences: none" in summary   # fp32: the drafter's output is the baseline's
    assert "HF greedy 2/2, HF lookup 2/2, HF assisted 2/2" in summary

    rows, summary = bench(tmp_path / "batch", "batch_size=2", "max_draft_batch=1")
    assert "HF lookup and HF assisted skipped (batch 2): HF runs them at batch size 1 only" in summary
    assert "× HF lookup" not in summary
    coding, editing = rows
    for r in rows:
        assert r["hf_lookup"] is None and r["hf_assisted"] is None and r["hf"]["new_tokens"] > 0
        assert r["max_draft_batch"] == 1 and r["matches_baseline"] and r["hf_matches_baseline"] == {"hf": True}
    # Turn 1 of both prompts is one call: while both rows run (more than 1), no step drafts, so each
    # row's undrafted steps are the shorter row's steps. Editing's turn 2 runs alone, and drafts.
    both = min(coding["turn_steps"][0], editing["turn_steps"][0])
    assert coding["undrafted_steps"] == editing["undrafted_steps"] == both > 0
    assert editing["turn_steps"][1] > 0
    assert f"{2 * both} of {coding['steps'] + editing['steps']} row-steps ran without a draft" in summary

    # Engine options reach both engines: with cache_len every Decoder holds that many slots, and
    # HF's greedy methods still give the baseline's tokens.
    from specdec.step import Decoder

    sizes = []
    real = Decoder.__init__
    monkeypatch.setattr(Decoder, "__init__", lambda self, *a, **kw: sizes.append(a[4]) or real(self, *a, **kw))
    rows, summary = bench(tmp_path / "sized", "cache_len=300")
    assert len(sizes) >= 2 and all(n >= 300 for n in sizes)   # the baseline's and the drafter's
    assert all(r["hf_matches_baseline"] == {"hf": True, "hf_lookup": True, "hf_assisted": True} for r in rows)
    assert "Divergences: none" in summary


@pytest.mark.slow
@pytest.mark.zoo
def test_smollm2_prompt_lookup_matches_its_baseline(tmp_path):
    """The real SmolLM2 on one multi-turn editing prompt: lossless in fp32, and τ above 1."""
    with initialize_config_module("specdec.conf", version_base=None):
        cfg = compose("bench", overrides=["drafter=lookup", "categories=[editing]", "num_prompts=1",
                                          "max_new_tokens=32", "modes=[greedy]", "logger=none",
                                          "progress=false", "warmup=0", "threads=1"])
    summary = run_bench(cfg, tmp_path)
    assert summary["greedy"]["all"]["matches_baseline"] == "1/1"
    assert summary["greedy"]["all"]["tau"] > 1.0
    assert (tmp_path / "rows.jsonl").exists()
