"""``python -m specdec.bench``: the harness's command line, plain arguments and no Hydra.

Drafters are ``NAME[:KEY=VALUE,...]`` specs over the registered names (``specdec.drafters.DRAFTERS``);
give ``--drafter`` several times to compare them in one process, against one baseline. Values
are JSON where they parse as JSON (``8``, ``0.6``, ``true``, ``null``, ``[4,5]``), else strings. A
spec's ``max_draft_batch`` / ``min_tau`` set that drafter's policy (``min_tau=auto``: measured costs). Prompt sources are ``builtin``,
``humaneval``, ``long`` (with ``KEY=VALUE`` options too) or a Spec-Bench jsonl path; give
``--prompts`` several times to pool them (each keeps its categories, HumanEval's is "humaneval").

    python -m specdec.bench --drafter lookup:num_tokens=8 --drafter lookup:num_tokens=4 \\
        --prompts builtin --prompts humaneval --categories coding humaneval --num-prompts 20
    python -m specdec.bench --model zoo:qwen2.5-coder-1.5b-instruct --cuda-graphs --compile \\
        --drafter draft_model:spec=zoo:qwen2.5-coder-0.5b-instruct,num_tokens=4 --batch-size 1 4 16 --out $OUT/b
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from specdec.bench.prompts import Prompt, builtin, humaneval, select, specbench

SAMPLING = {"temperature": 0.7, "top_p": 1.0, "top_k": 0}   # the sample mode's defaults


def parse_spec(text: str, what: str = "drafter") -> tuple[str, dict]:
    """``"lookup:num_tokens=8,max_ngram=3"`` -> ``("lookup", {"num_tokens": 8, "max_ngram": 3})``.

    Commas inside brackets or quotes do not split: ``layerskip:skip_layers=[4,5],num_tokens=4``.
    """
    name, _, rest = text.partition(":")
    if not name.strip():
        raise ValueError(f"{what} spec {text!r} has no name; write NAME or NAME:KEY=VALUE,...")
    options = {}
    for item in _split(rest) if rest else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{what} spec {text!r}: {item!r} is not KEY=VALUE; write e.g. {name}:num_tokens=8")
        if key.strip() in options:
            raise ValueError(f"{what} spec {text!r} sets {key.strip()!r} twice")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return name.strip(), options


def _split(text: str) -> list[str]:
    """Split on commas that are outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def load_prompts(sources: Sequence[str]) -> list[Prompt]:
    """The prompts of every source, in order; a question id seen in two sources is an error."""
    prompts: list[Prompt] = []
    for source in sources:
        name, options = parse_spec(source, "prompts")
        if name == "builtin":
            if options:
                raise ValueError(f"--prompts {source}: the built-in set takes no options")
            got = builtin()
        elif name == "humaneval":
            got = humaneval(**options)
        elif name == "long":
            from specdec.bench.long_prompts import long_prompts

            got = long_prompts(**options)
        else:   # a Spec-Bench jsonl file (its path may hold a colon: take the whole source)
            got = specbench(source)
        prompts += got
    ids = [json.dumps([p.category, p.question_id]) for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"prompt {dup} appears twice across --prompts {' '.join(sources)}; give each source once")
    return prompts


def min_tau_arg(text: str) -> float | str:
    """``--min-tau``: a number, or ``auto``; ``specdec.gate.check_min_tau`` judges the value."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m specdec.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--model", default="zoo:smollm2-135m-instruct", help="HF id, folder, .gguf or zoo:NAME")
    add("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add("--drafter", action="append", metavar="SPEC", help="NAME[:KEY=VALUE,...]; repeat to compare (default: lookup)")
    add("--prompts", action="append", metavar="SOURCE", help="builtin | humaneval | long[:KEY=VALUE,...] | FILE.jsonl")
    add("--categories", nargs="+", default=None, help="keep these categories only")
    add("--num-prompts", type=int, default=None, help="at most this many, round-robin over categories")
    add("--batch-size", type=int, nargs="+", default=[1], help="one or more batch sizes")
    add("--modes", nargs="+", default=["greedy"], choices=["greedy", "sample"])
    add("--temperature", type=float, default=None, help="sample mode only (default 0.7)")
    add("--top-p", type=float, default=None, help="sample mode only (default 1.0)")
    add("--top-k", type=int, default=None, help="sample mode only (default 0: no top-k filter)")
    add("--max-new-tokens", type=int, default=128, help="per turn")
    add("--warmup", type=int, default=1, help="untimed batches per method; the first one is the timed first call")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=None, help="torch CPU threads")
    add("--cuda-graphs", action="store_true", help="replay steps as CUDA graphs (captured before timing)")
    add("--compile", nargs="?", const="true", default="false", metavar="OPTIONS",
        help="torch.compile the forwards too; optionally Inductor options as JSON")
    add("--chunk-steps", type=int, default=None, help="steps per host sync (default 8 with graphs, else 1)")
    add("--pipeline", action=argparse.BooleanOptionalAction, default=None)
    add("--cache-len", type=int, default=None)
    add("--max-draft-batch", type=int, default=None, help="default batch policy of every drafter")
    add("--min-tau", type=min_tau_arg, default=None,
        help="default acceptance policy of every drafter: a number >= 1, or auto (measured step costs)")
    add("--no-hf", action="store_true", help="do not time HF greedy generate (no × HF column)")
    add("--hf-lookup", type=int, default=None, help="also time HF prompt lookup with N tokens (batch 1)")
    add("--hf-assistant", default=None, help="also time HF assisted generation with this draft model (batch 1)")
    add("--no-divergence-check", action="store_true", help="skip the top-2 logit gap at greedy divergences")
    add("--quiet", action="store_true", help="no per-batch progress lines")
    add("--out", default=None, help="output folder (default bench/<date>_<time>)")
    return ap


def settings_from(args: argparse.Namespace):
    """``BenchSettings`` for parsed arguments."""
    from specdec.bench.core import BenchSettings

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    given = [k for k, v in sampling.items() if v is not None]
    if given and "sample" not in args.modes:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to the sample mode only; add --modes greedy sample")
    sampling = {k: v if v is not None else SAMPLING[k] for k, v in sampling.items()}
    compile_ = json.loads(args.compile) if args.compile not in ("true", "false") else args.compile == "true"
    drafters = tuple(dict(name=name, **options) for name, options in map(parse_spec, args.drafter or ["lookup"]))
    return BenchSettings(
        model=args.model, dtype=args.dtype, device=args.device, drafters=drafters,
        batch_sizes=tuple(args.batch_size), modes=tuple(args.modes),
        sampling=sampling,
        max_new_tokens=args.max_new_tokens, warmup=args.warmup, seed=args.seed, threads=args.threads,
        cuda_graphs=args.cuda_graphs, compile=compile_, chunk_steps=args.chunk_steps, pipeline=args.pipeline,
        cache_len=args.cache_len, max_draft_batch=args.max_draft_batch, min_tau=args.min_tau,
        hf_baseline=not args.no_hf, hf_lookup=args.hf_lookup, hf_assistant=args.hf_assistant,
        check_divergences=not args.no_divergence_check, progress=not args.quiet)


def main(argv: Sequence[str] | None = None):
    """Parse, load the prompts, run the harness; bad arguments exit with the problem named."""
    ap = parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from(args)
        prompts = select(load_prompts(args.prompts or ["builtin"]), args.num_prompts, args.categories)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
        ap.error(str(e))
    from specdec.bench.core import run

    out = args.out or time.strftime("bench/%Y-%m-%d_%H-%M-%S")
    return run(settings, prompts, out)
