"""Command-line entry points: ``specdec generate|train|bench`` and ``specdec-train``/``specdec-bench``.

Each command is a thin Hydra wrapper around a plain function that tests call directly with a
composed config. Hydra is imported here and in the entry modules only, never by core code.

Examples::

    specdec generate                                   # SmolLM2 + prompt lookup, default prompt
    specdec generate prompt="Explain KV caches" drafter=none max_new_tokens=64
    specdec-bench -m drafter=lookup,none drafter.num_tokens=4,8
"""
from __future__ import annotations

import sys

import torch

USAGE = """usage: specdec COMMAND [hydra overrides...]

commands:
  generate   one chat completion with speculative decoding (conf/generate.yaml)
  train      train a drafter (conf/train.yaml); same as specdec-train
  bench      acceptance and speed sweeps (conf/bench.yaml); same as specdec-bench, a Hydra
             layer over `python -m specdec.bench` (plain arguments, no Hydra)
  zoo        check or rebuild the zoo cache: `specdec zoo verify [NAME...]`, `specdec zoo rebuild NAME`

Overrides use Hydra syntax, e.g. `specdec generate drafter=none max_new_tokens=32`;
add --help after the command to list the config groups and options.
"""


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | None, device: str) -> str:
    if dtype in (None, "auto"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    return str(dtype)


def resolve_model_cfg(cfg) -> None:
    """Replace ``auto`` device/dtype in ``cfg.model`` in place, so interpolations see real values."""
    cfg.model.device = resolve_device(cfg.model.get("device"))
    cfg.model.dtype = resolve_dtype(cfg.model.get("dtype"), cfg.model.device)


def run_generate(cfg) -> dict:
    """Load the model and drafter from ``cfg``, generate once, print and return the result."""
    from omegaconf import OmegaConf

    import specdec
    from specdec.drafters import build_drafter

    resolve_model_cfg(cfg)
    torch.manual_seed(cfg.seed)
    model, tok = specdec.load_model(cfg.model.spec, dtype=cfg.model.dtype, device=cfg.model.device)
    drafter_cfg = OmegaConf.to_container(cfg.drafter, resolve=True)
    spec = specdec.wrap(model, drafter=build_drafter(drafter_cfg, target=model), acceptance=cfg.acceptance)
    if cfg.chat_template and getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
        messages.append({"role": "user", "content": cfg.prompt})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(cfg.prompt, return_tensors="pt")
    sampling = {"do_sample": cfg.do_sample}
    if cfg.do_sample:
        sampling.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    streamer = None
    if cfg.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = spec.generate(enc.input_ids.to(model.device), attention_mask=enc.attention_mask.to(model.device),
                        max_new_tokens=cfg.max_new_tokens, return_dict_in_generate=True, streamer=streamer,
                        **sampling,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    completion = tok.decode(out.sequences[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    if not cfg.stream:
        print(completion)
    print(f"\n[specdec] {out.spec_stats.summary()}")
    result = {"completion": completion, "stats": out.spec_stats.to_dict()}
    if cfg.get("output_dir"):
        import json
        from pathlib import Path

        path = Path(cfg.output_dir) / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        print(f"[specdec] wrote {path}")
    return result


def _hydra_entry(config_name: str, fn):
    import hydra

    @hydra.main(config_path="pkg://specdec.conf", config_name=config_name, version_base=None)
    def _main(cfg):
        fn(cfg)

    return _main


def generate_main() -> None:
    """``specdec generate``: writes no Hydra run folder (outputs/, .hydra/) unless ``output_dir=`` is given."""
    if not any(arg.lstrip("+").startswith("output_dir=") for arg in sys.argv[1:]):
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null"]
    _hydra_entry("generate", run_generate)()


def train_main() -> None:
    from specdec.training.entry import hydra_main

    hydra_main()


def bench_main() -> None:
    from specdec.bench import hydra_main

    hydra_main()


def zoo_main(argv: list[str] | None = None) -> None:
    """``specdec zoo verify [NAME...]``: re-hash every cached file of the named (default: every
    cached) zoo model, exit 1 if any is damaged; ``specdec zoo rebuild NAME``: delete and rebuild."""
    import argparse

    from specdec import zoo

    parser = argparse.ArgumentParser(prog="specdec zoo", description="Check or rebuild the zoo cache.")
    sub = parser.add_subparsers(dest="action", required=True)
    verify = sub.add_parser("verify", help="re-hash every cached file against its recorded sha256")
    verify.add_argument("names", nargs="*", help=f"zoo models (default: every cached one of {', '.join(zoo.names())})")
    rebuild = sub.add_parser("rebuild", help="delete a zoo model's cache folder and build it again")
    rebuild.add_argument("name", choices=zoo.names())
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.action == "rebuild":
        from specdec.loading import dense_zoo_dir

        print(f"removed {zoo.remove_cache(args.name)}")
        print(f"rebuilt {dense_zoo_dir(args.name)}")
        return
    try:
        names = [zoo.get(n).name for n in args.names] or [n for n in zoo.names() if zoo.model_dir(n).exists()]
    except zoo.UnknownZooModel as err:
        parser.error(str(err))
    damaged = []
    for name in names:
        results = zoo.verify(name)
        if not results:
            print(f"{name}: nothing cached in {zoo.model_dir(name)}")
        for path, problem in results:
            print(f"{'ok' if problem is None else 'DAMAGED':8} {path}" + (f": {problem}" if problem else ""))
        if any(problem for _, problem in results):
            damaged.append(name)
    if damaged:
        sys.exit("specdec zoo verify: damaged files; rebuild with: "
                 + "; ".join(zoo.rebuild_command(n) for n in damaged))


COMMANDS = {"generate": generate_main, "train": train_main, "bench": bench_main, "zoo": zoo_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"specdec: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n\n{USAGE}")
    sys.argv = [f"specdec {command}", *rest]
    COMMANDS[command]()
