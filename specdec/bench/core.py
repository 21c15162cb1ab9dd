"""The benchmark harness, Hydra-free: plain settings in; rows, tables and plots out.

``run(settings, prompts, out_dir)`` decodes the same prompts, in one process, with the engine and
no drafter (the baseline), with every drafter of ``settings.drafters`` and with HF's own greedy
``generate``, at each batch size and mode. Turn t of a prompt is rendered with the method's own
answers to its earlier turns (``measure.decode``). Each method's first call (which compiles and
captures) is timed apart from the timed, warm ones. Rows are appended to ``rows.jsonl`` after
every batch, so a run cut short keeps what it measured (``python -m specdec.bench.collect OUT``
tables it). It imports torch and transformers only (matplotlib for plots, skipped without it):
``python -m specdec.bench`` is its command line, and ``specdec-bench`` (Hydra) a thin layer over it.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import specdec
from specdec.bench.measure import decode, divergence_gap, engine_method, hf_method
from specdec.bench.prompts import Prompt, render
from specdec.bench.rows import drafter_name, drafter_params, make_row
from specdec.bench.report import HF_LABELS, aggregate, by_category, fmt, run_label, write_reports
from specdec.gate import check_min_tau

MODES = ("greedy", "sample")
POLICY_KEYS = ("max_draft_batch", "min_tau", "memory_budget")   # drafter-spec keys that set wrap options, not the drafter
_MODELS: dict[tuple, tuple] = {}   # (spec, dtype, device) -> (model, tokenizer), reused across runs


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """Everything one benchmark run needs besides its prompts. ``drafters`` are
    ``specdec.drafters.build_drafter`` mappings, ``{"name": "lookup", "num_tokens": 8}`` or
    ``{"_target_": ..., ...}``; ``{"name": "none"}`` benchmarks the baseline against itself. A
    mapping's ``max_draft_batch`` / ``min_tau`` / ``memory_budget`` keys set those ``wrap`` options
    for that drafter (default: the settings' own)."""
    model: str = "zoo:smollm2-135m-instruct"
    dtype: str = "auto"              # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"             # auto: cuda when available
    drafters: tuple[Mapping, ...] = ({"name": "lookup"},)
    batch_sizes: tuple[int, ...] = (1,)
    modes: tuple[str, ...] = ("greedy",)
    sampling: Mapping = field(default_factory=lambda: {"temperature": 0.7, "top_p": 1.0, "top_k": 0})
    max_new_tokens: int = 128
    warmup: int = 1                  # batches each method decodes untimed first; the first is the "first call"
    seed: int = 0
    threads: int | None = None       # torch CPU threads; None: torch's default
    cuda_graphs: bool = False
    compile: bool | Mapping = False  # or Inductor options
    chunk_steps: int | None = None
    pipeline: bool | None = None
    cache_len: int | None = None
    max_draft_batch: int | None = None
    min_tau: float | str | None = None   # or "auto" (specdec.gate.DraftGate)
    memory_budget: int | None = None  # bytes of extra memory drafting may use (wrap's memory_budget)
    hf_baseline: bool = True         # time HF greedy generate too (the "× HF" column)
    hf_lookup: int | None = None     # N: also HF prompt lookup (greedy, batch 1)
    hf_assistant: str | None = None  # a model spec: also HF assisted generation (greedy, batch 1)
    check_divergences: bool = True   # greedy outputs that part from the baseline: the top-2 logit gap there
    progress: bool = True

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes: {bad or '[]'} not allowed; choose from {MODES}")
        for name in ("max_new_tokens", "warmup", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "max_new_tokens"):
                raise ValueError(f"{name} must be an integer >= {int(name == 'max_new_tokens')}, got {value!r}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {list(self.batch_sizes)}")
        if not self.drafters:
            raise ValueError("drafters is empty; give at least one (e.g. {'name': 'lookup'}, or {'name': 'none'})")
        for value in (self.min_tau, *(d.get("min_tau") for d in self.drafters)):
            check_min_tau(value)   # a bad policy fails before any model loads


@dataclass
class Contender:
    """One drafter configuration under test: its label, its drafter (None: no drafter) and policy."""
    name: str
    params: dict
    policy: dict                     # max_draft_batch, min_tau for its wrap
    drafter: object | None

    def identity(self, **settings) -> dict:
        return {"drafter": self.name, "params": self.params, **self.policy, **settings}

    @property
    def label(self) -> str:
        return run_label(self.identity())

    def owns(self, row: dict) -> bool:
        """Whether ``row`` is one of this contender's."""
        return all(row[k] == v for k, v in self.identity().items())


@dataclass
class BenchResult:
    rows: list[dict]
    summary: dict[str, dict[str, dict[str, dict]]]   # run label -> mode -> category -> aggregate
    summary_path: Path


def run(settings: BenchSettings, prompts: Sequence[Prompt], out_dir: str | Path) -> BenchResult:
    """Benchmark ``prompts`` under ``settings``; write ``rows.jsonl``, ``summary.md`` and plots into
    ``out_dir``, print where ``summary.md`` is, and return the rows and per-run aggregates."""
    if not prompts:
        raise ValueError("no prompts to benchmark: the prompt source or category filter selected none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or threads)
    try:
        model, tok = load_cached(settings.model, settings.dtype, settings.device)
        contenders = build_contenders(settings.drafters, model, settings)
        bench = _Bench(settings, list(prompts), model, tok, contenders, out_dir)
        for batch_size in settings.batch_sizes:
            bench.batch_size(batch_size)
        path = write_reports(bench.rows, out_dir, bench.header(), bench.profiles)
    finally:
        torch.set_num_threads(threads)
    print(f"specdec-bench: summary in {path}", flush=True)
    return BenchResult(bench.rows, bench.summary(), path)


def build_contenders(specs: Sequence[Mapping], model, settings: BenchSettings) -> list[Contender]:
    """Every drafter of a benchmark is built here, once, through ``build_drafter``. A spec by
    registered name that leaves out ``dtype``, ``device`` or ``target`` gets the target model's,
    where the drafter's factory takes them (a draft model or head then sits beside the target;
    ``dtype=null`` keeps a head's own fp32)."""
    from specdec.drafters import DRAFTERS, build_drafter

    out, seen = [], set()
    dtype, device = str(model.dtype).removeprefix("torch."), str(next(model.parameters()).device)
    for spec in specs:
        spec = dict(spec)
        policy = {k: spec.pop(k, getattr(settings, k)) for k in POLICY_KEYS}
        name, params = drafter_name(spec), drafter_params(spec)
        factory = DRAFTERS.get(spec.get("name")) if "_target_" not in spec else None
        if factory is not None:   # a registered name: weights land on the target's dtype and device
            accepted = inspect.signature(factory).parameters
            given = (("dtype", dtype), ("device", device), ("target", model))
            spec |= {k: v for k, v in given if k in accepted and k not in spec}
        contender = Contender(name, params, policy, build_drafter(spec, target=model))
        if contender.label in seen:
            raise ValueError(f"drafter {contender.label!r} is given twice; give each configuration once")
        seen.add(contender.label)
        out.append(contender)
    return out


def load_cached(spec: str, dtype: str | None = "auto", device: str | None = "auto"):
    """``specdec.load_model``, once per process (a Hydra multirun does not reload the weights)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else str(device)
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if dtype in (None, "auto") else str(dtype)
    key = (spec, dtype, device)
    if key not in _MODELS:
        model, tok = specdec.load_model(spec, dtype=dtype, device=device)
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _MODELS[key] = (model.eval(), tok)
    return _MODELS[key]


class _Bench:
    """One process's measurements: the loops over batch sizes, modes and batches."""

    def __init__(self, settings, prompts, model, tok, contenders, out_dir: Path):
        self.s, self.prompts, self.model, self.tok, self.contenders = settings, prompts, model, tok, contenders
        self.device = next(model.parameters()).device
        self.rows: list[dict] = []
        self.profiles: dict[str, dict] = {}   # run label -> {"baseline", "drafter", "floor_ms"}
        self.notes: list[str] = []
        self.refused: set[str] = set()  # contender labels that refused this mode (MemoryError; the notes say why)
        self.rows_path = out_dir / "rows.jsonl"
        self.rows_path.write_text("", encoding="utf-8")
        eos = model.generation_config.eos_token_id
        self.common = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": tok.pad_token_id,
                       "eos_token_id": tok.eos_token_id if eos is None else eos}
        self.fast = {"cuda_graphs": settings.cuda_graphs, "compile": settings.compile,
                     "chunk_steps": settings.chunk_steps, "pipeline": settings.pipeline,
                     "cache_len": settings.cache_len}

    def batch_size(self, size: int) -> None:
        """Every mode at one batch size: one baseline wrapper, one per drafter, the same prompts."""
        batches = [self.prompts[i: i + size] for i in range(0, len(self.prompts), size)]
        baseline = specdec.wrap(self.model, drafter=None, **self.fast)
        wrapped = [specdec.wrap(self.model, drafter=c.drafter, **c.policy, **self.fast) if c.drafter else None
                   for c in self.contenders]
        if self.s.cuda_graphs:   # every cache bucket captured (and compiled) before anything is timed
            longest = max_length(self.prompts, self.tok, self.s.max_new_tokens)
            for w in filter(None, (baseline, *wrapped)):
                w.engine.reserve(size, longest)
        others = self.hf_others(size)
        hf: dict[str, dict[int, list]] = {}   # HF method -> batch index -> results, measured once
        hf_first: dict[str, dict | None] = {}   # HF method -> its first call, measured once
        for mode in self.s.modes:
            self.mode(mode, size, batches, baseline, wrapped, others, (hf, hf_first))
            if mode == "greedy" and self.s.cuda_graphs:
                self.profile(size, baseline, wrapped)

    def hf_others(self, size: int) -> dict[str, dict]:
        """HF's prompt lookup and assisted generation, as more references (greedy, batch 1 only)."""
        others = {}
        if self.s.hf_lookup:
            others["hf_lookup"] = {"prompt_lookup_num_tokens": int(self.s.hf_lookup)}
        if self.s.hf_assistant:
            assistant = load_cached(self.s.hf_assistant, str(self.model.dtype).removeprefix("torch."),
                                    str(self.device))[0]
            others["hf_assisted"] = {"assistant_model": assistant}
        if others and size > 1:
            self.notes.append(f"{' and '.join(HF_LABELS[k] for k in others)} skipped (batch {size}): "
                              "HF runs them at batch size 1 only.")
            return {}
        return others

    def mode(self, mode, size, batches, baseline, wrapped, others, hf_state) -> None:
        """One mode at one batch size: warm-up (first calls timed), then per batch the baseline,
        each drafter and HF in turn, so load on a shared machine hits them all alike. HF is
        greedy only, measured in the first mode and reused (``hf_state``: results, first calls)."""
        hf, hf_first = hf_state
        self.refused = set()
        sampling = {} if mode == "greedy" else dict(self.s.sampling)
        kwargs = {k: v for k, v in self.common.items()} | {"do_sample": mode == "sample", **sampling}
        engines = [("baseline", baseline), *((c.label, w) for c, w in zip(self.contenders, wrapped) if w)]
        methods = {name: engine_method(w, **kwargs) for name, w in engines}
        hf_methods = {}
        if self.s.hf_baseline and "hf" not in hf:
            hf_methods["hf"] = hf_method(self.model, **self.common, do_sample=False)
        if mode == "greedy":
            hf_methods |= {k: hf_method(self.model, **self.common, do_sample=False, **extra)
                           for k, extra in others.items() if k not in hf}
        wrappers = dict(engines)
        first = {}
        for name in list(methods):
            first[name] = self.refusing(name, mode, size, lambda: self.first_call(methods[name], wrappers[name], batches))
            if name in self.refused:
                del methods[name]
        hf_first |= {name: self.first_call(m, None, batches) for name, m in hf_methods.items()}
        first |= hf_first
        settings = {"mode": mode, "temperature": sampling.get("temperature"), "top_p": sampling.get("top_p"),
                    "top_k": sampling.get("top_k"), "batch_size": size}
        drafters = {c.label: c.drafter for c in self.contenders}
        for b, batch in enumerate(batches):
            seed = self.s.seed + 1000 * b
            done = {}
            for name, m in methods.items():
                if hasattr(drafters.get(name), "task"):   # drafters that keep per-task state (Swift's skip sets)
                    drafters[name].task = batch[0].category
                done[name] = self.refusing(name, mode, size, lambda: self.timed(m, wrappers[name], batch, seed))
            for name in [n for n in methods if n in self.refused]:
                del methods[name], done[name]
            for name, m in hf_methods.items():
                hf.setdefault(name, {})[b] = decode(m, batch, self.tok, self.device, seed)
            new = [self.row(c, settings, b, i, prompt, done, first, hf, wrapped[k])
                   for k, c in enumerate(self.contenders) for i, prompt in enumerate(batch)
                   if wrapped[k] is None or c.label in done]
            self.save(new)
            self.progress(mode, size, b, len(batches), new)

    def refusing(self, name: str, mode: str, size: int, call):
        """``call()``; a drafter that refuses the run with a ``MemoryError`` (a ``memory_budget``
        below its smallest configuration) is noted in the summary and left out of this mode,
        while the others go on. The baseline's errors propagate."""
        if name == "baseline":
            return call()
        try:
            return call()
        except MemoryError as err:
            self.refused.add(name)
            self.notes.append(f"{name} refused the {mode} run at batch {size}, so it has no rows there: {err}")
            return None

    def first_call(self, method, wrapped, batches) -> dict | None:
        """Decode the warm-up batches untimed; the first one's time (the call that compiles and
        captures) is kept, with the graphs captured and frames compiled during it."""
        if not self.s.warmup:
            return None
        record = None
        for k, batch in enumerate(batches[: self.s.warmup]):
            before = _captures(wrapped)
            out = decode(method, batch, self.tok, self.device, seed=self.s.seed)
            if k == 0:
                record = {"seconds": sum(d.wall_time for d in out), "prompts": len(batch),
                          **_new_captures(before, _captures(wrapped))}
        return record

    def timed(self, method, wrapped, batch, seed) -> tuple[list, dict]:
        """One timed batch, with the graphs captured and frames compiled during it (0 once warm)."""
        before = _captures(wrapped)
        out = decode(method, batch, self.tok, self.device, seed)
        return out, _new_captures(before, _captures(wrapped))

    def row(self, contender, settings, b, i, prompt, done, first, hf, wrapped) -> dict:
        base, base_captures = done["baseline"]
        drafted, captures = done[contender.label] if wrapped is not None else done["baseline"]
        identity = {"model": self.s.model, "dtype": str(self.model.dtype).removeprefix("torch."),
                    "device": str(self.device), "max_new_tokens": self.s.max_new_tokens,
                    **contender.identity(**settings)}
        greedy = settings["mode"] == "greedy"
        others = {name: res[b][i] for name, res in hf.items() if b in res and (name == "hf" or greedy)}
        row = make_row(identity, prompt, drafted[i], base[i], others)
        label = contender.label if wrapped is not None else "baseline"
        row |= {"batch_index": b, "first_call": first.get(label), "captures": captures}
        row["baseline"] |= {"first_call": first.get("baseline"), "captures": base_captures}
        for name in others:
            row[name]["first_call"] = first.get(name)
        if row["first_divergence"] is not None and self.s.check_divergences:
            row["divergence"] = divergence_gap(self.model, self.tok, prompt, base[i], drafted[i],
                                               row["first_divergence"], self.device)
        return row

    def save(self, rows: list[dict]) -> None:
        """Append a batch's rows to rows.jsonl at once, so a run cut short keeps them."""
        self.rows += rows
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def progress(self, mode, size, b, total, rows) -> None:
        if not self.s.progress:
            return
        cells = []
        for c in self.contenders:
            agg = aggregate([r for r in rows if c.owns(r)])
            cells.append(f"{c.label}: τ {fmt(agg['tau'])} × baseline {fmt(agg['speedup'])}")
        print(f"[{mode}, batch {size}] {b + 1}/{total}  " + "; ".join(cells), flush=True)

    def profile(self, size, baseline, wrapped) -> None:
        """Where a captured step's device time goes, per drafter, beside the bandwidth floor."""
        from specdec.perf import step_floor

        rows = [r for r in self.rows if r["batch_size"] == size]
        context = max(sum(r["prompt_tokens"]) // len(r["prompt_tokens"]) for r in rows) + self.s.max_new_tokens // 2
        floor = step_floor(self.model, batch=size, context=context).ms
        base = baseline.engine.step_profile()
        for c, w in zip(self.contenders, wrapped):
            ms = {"baseline": base, "drafter": w.engine.step_profile() if w else None, "floor_ms": floor}
            self.profiles[run_label(c.identity(batch_size=size))] = {k: v for k, v in ms.items() if v}

    def header(self) -> list[str]:
        gpu = f", {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else ""
        fast = ", ".join(f"{k} {v}" for k, v in self.fast.items() if v not in (None, False))
        return [(f"Model `{self.s.model}` ({str(self.model.dtype).removeprefix('torch.')}, {self.device}{gpu}), "
                 f"{len(self.prompts)} prompts, max_new_tokens {self.s.max_new_tokens}, warm-up "
                 f"{self.s.warmup} batch(es){'; ' + fast if fast else ''}; torch {torch.__version__}, "
                 f"{torch.get_num_threads()} CPU threads."), *dict.fromkeys(self.notes)]

    def summary(self) -> dict:
        """Run label -> mode -> category -> aggregate, for every contender at every batch size."""
        out = {}
        for c in self.contenders:
            for size in self.s.batch_sizes:
                mine = [r for r in self.rows if c.owns(r) and r["batch_size"] == size]
                out[run_label(c.identity(batch_size=size))] = {
                    m: by_category([r for r in mine if r["mode"] == m]) for m in self.s.modes}
        return out


def max_length(prompts: Sequence[Prompt], tokenizer, max_new_tokens: int) -> int:
    """An upper bound on any call's prompt plus new tokens: every turn rendered with answers of
    ``max_new_tokens`` tokens (placeholder text a little longer than that)."""
    filler = " x" * (max_new_tokens + 8)
    longest = 0
    for p in prompts:
        text = render(tokenizer, p.turns, [filler] * (len(p.turns) - 1))
        longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return longest + max_new_tokens + 16


def _captures(wrapped) -> tuple[object, int, int]:
    """(the wrapper's step decoder, the CUDA graphs it holds, frames Dynamo has compiled so far)."""
    from torch._dynamo.utils import counters

    decoder = wrapped.engine._decoder if wrapped is not None else None
    return decoder, decoder.num_graphs if decoder is not None else 0, int(counters["frames"]["ok"])


def _new_captures(before: tuple, after: tuple) -> dict[str, int]:
    """Graphs captured and frames compiled between two ``_captures`` (a new decoder, built for a
    bigger cache, starts its count from zero)."""
    graphs = after[1] - before[1] if after[0] is before[0] else after[1]
    return {"graphs": graphs, "compiles": after[2] - before[2]}
