"""Our RestDrafter beside REST's own retrieval (the ``draftretriever`` package), one engine for both.

Both read the same token documents (those of one of our indexes, tokenised once), get the same
node budget, depth and suffix lengths, and both drafts are verified by specdec's engine, so the
τ columns differ only by retrieval: which suffix matched, which occurrences were read, which
trie was kept. A no-drafter run of the same engine gives the speed baseline.

Two of ours run: "ours (REST)" is the datastore alone with the peer's suffix lengths
(``context_weight=0``, ``min_count=1``), "ours" the defaults (datastore mixed with the row's own
text, suffixes from 1 token, ``min_count=16``).

What the PyPI build of draftretriever (0.1.1) does, found by probing it: ``Reader.search`` adds
every query to its datastore, so it also retrieves from the context it was shown (like prompt
lookup); the adapter opens a fresh Reader for each generate call so prompts stay independent.
A one-token query aborts the process (a Rust panic), so its suffixes stop at 2 tokens.
arctic-inference's suffix decoding, another peer, does not install here (its sdist needs vllm).

    python scripts/rest_peer.py --num-prompts 12 --max-new-tokens 64 --out rest_peer.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import specdec
from specdec.bench.prompts import builtin, render, select
from specdec.datastore import Datastore
from specdec.drafters.base import DraftSpec, Drafter
from specdec.drafters.rest import RestDrafter, Trie
from specdec.verifiers.tree import DraftTree


class DraftRetrieverAdapter(Drafter):
    """A specdec drafter around ``draftretriever.Reader``: REST's search, our DraftTree.

    ``Reader.search(suffix, k, choices, long)`` returns the kept trie as padded token paths
    (``-2`` padding) plus Medusa-style buffers; the paths alone define the trie, which is
    rebuilt here in specdec's (tokens, parents) form. Suffixes are tried longest first and the
    first one with any continuation wins, as in REST's generation loop.
    """

    def __init__(self, path: str, vocab_size: int, num_nodes: int = 32, max_depth: int = 8, max_suffix: int = 16,
                 min_suffix: int = 2, k: int = 5000):
        if min_suffix < 2:
            raise ValueError("draftretriever 0.1.1 aborts on one-token queries; use min_suffix >= 2")
        self.path, self.reader, self.vocab_size = path, None, vocab_size
        self.num_nodes, self.max_depth = num_nodes, max_depth
        self.spec = DraftSpec(num_nodes=num_nodes, device_only=False)  # a host search every step
        self.max_suffix, self.min_suffix, self.k = max_suffix, min_suffix, k

    def begin(self, ctx) -> None:
        import draftretriever

        self.reader = draftretriever.Reader(self.path)  # fresh: search() adds each query to the index

    def draft_row(self, context: list[int]) -> Trie:
        for m in range(min(self.max_suffix, len(context)), self.min_suffix - 1, -1):
            try:
                paths = self.reader.search(context[-m:], k=self.k, choices=self.num_nodes, long=self.max_depth)[0]
            except ValueError:  # "draft_choices was not cut enough": no usable tree for this suffix
                continue
            children: dict[tuple[int, int], int] = {}
            tokens, parents = [], []
            for path in paths:
                parent = -1
                for tok in path:
                    if tok < 0 or tok >= self.vocab_size:  # padding, or a document separator
                        break
                    node = children.get((parent, tok))
                    if node is None:
                        if len(tokens) == self.num_nodes:
                            break
                        node = children[(parent, tok)] = len(tokens)
                        tokens.append(tok)
                        parents.append(parent)
                    parent = node
            if tokens:
                t = np.array(tokens, dtype=np.int64)
                return Trie(t, np.array(parents, dtype=np.int64), np.ones_like(t))
        return Trie.empty()

    def propose(self, ctx) -> DraftTree:
        b, w, n = ctx.tokens.shape[0], self.max_suffix, self.num_nodes
        cols = ctx.seq_len.unsqueeze(1) - w + torch.arange(w, device=ctx.tokens.device)
        host = torch.cat([ctx.tokens.gather(1, cols.clamp(min=0)), ctx.seq_len[:, None], ctx.start[:, None]], 1).tolist()
        out = np.zeros((3, b, n), dtype=np.int64)
        out[1] = -1
        for r, (*win, seq, start) in enumerate(host):
            trie = self.draft_row(win[w - min(w, seq - start):])
            k = len(trie)
            out[0, r, :k], out[1, r, :k], out[2, r, :k] = trie.tokens, trie.parents, 1
        tree = torch.from_numpy(out).to(ctx.tokens.device)
        return DraftTree(tokens=tree[0], parents=tree[1], valid=tree[2].bool())


def documents(ds: Datastore) -> list[np.ndarray]:
    parts = np.split(ds.tokens.astype(np.int32), np.flatnonzero(ds.tokens == ds.separator) + 1)
    return [p[p != ds.separator] for p in parts if (p != ds.separator).any()]


MEASURE = """
import gc, os, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
kind, path = sys.argv[1:]
if kind == "ours":
    from specdec.datastore import Datastore
    before = rss(); index = Datastore.load(path)
else:
    import draftretriever
    before = rss(); index = draftretriever.Reader(path)
gc.collect()
print(rss() - before)
"""


def load_rss_mib(kind: str, path: Path) -> float:
    """Resident memory a fresh process gains by loading one index (MiB)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def build_both(index: str, tokenizer: str, workdir: Path, options: dict) -> dict:
    """Load our index, rebuild both indexes from its documents (timed), measure both loaded."""
    import draftretriever

    if index.startswith("auto:"):
        from specdec.datastore import ensure_index

        index = str(ensure_index(tokenizer, index[len("auto:"):]))
    source = Datastore.load(index)
    docs = documents(source)
    vocab = source.vocab_size
    t0 = time.perf_counter()
    ours = Datastore.from_documents(docs, vocab_size=vocab, **{k: v for k, v in source.meta.items()
                                                               if k in ("tokenizer", "vocab_fingerprint", "source")})
    ours_build = time.perf_counter() - t0
    ours.save(workdir / "ours.npz")
    peer_path = workdir / "peer.idx"
    t0 = time.perf_counter()
    writer = draftretriever.Writer(str(peer_path), vocab_size=vocab + 1)  # + the separator
    for d in docs:
        writer.add_entry(d.tolist() + [vocab])  # the same separated stream as ours
    writer.finalize()
    del writer
    peer_build = time.perf_counter() - t0
    rest_only = dict(options, min_suffix=max(2, options["min_suffix"]), min_count=1, context_weight=0.0)
    ours_info = {"build_s": ours_build, "index_mib": ours.nbytes / 2**20, "rss_mib": load_rss_mib("ours", workdir / "ours.npz"),
                 "file_mib": (workdir / "ours.npz").stat().st_size / 2**20}
    peer_options = {k: options[k] for k in ("num_nodes", "max_depth", "max_suffix")}
    return {
        "index": index, "tokens": ours.num_tokens, "documents": ours.meta["num_documents"],
        "ours (REST)": {"drafter": RestDrafter(ours, **rest_only), **ours_info},
        "ours": {"drafter": RestDrafter(ours, **options), **ours_info},
        "draftretriever": {"drafter": DraftRetrieverAdapter(str(peer_path), vocab, min_suffix=2, **peer_options),
                           "build_s": peer_build, "index_mib": None, "rss_mib": load_rss_mib("draftretriever", peer_path),
                           "file_mib": peer_path.stat().st_size / 2**20},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--index", default="auto:stdlib", help="our index (path or auto:SOURCE); both read its documents")
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-nodes", type=int, default=32)
    ap.add_argument("--max-depth", type=int, default=8)
    ap.add_argument("--max-suffix", type=int, default=16)
    ap.add_argument("--min-suffix", type=int, default=1)
    ap.add_argument("--min-count", type=int, default=16)
    ap.add_argument("--context-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = specdec.load_model(args.model, dtype=torch.float32)
    options = dict(num_nodes=args.num_nodes, max_depth=args.max_depth, max_suffix=args.max_suffix,
                   min_suffix=args.min_suffix, min_count=args.min_count, context_weight=args.context_weight)
    tmp = tempfile.TemporaryDirectory()  # the peer reopens its index file at every generate call
    built = build_both(args.index, args.model, Path(tmp.name), options)
    prompts = select(builtin(), args.num_prompts)
    encoded = [tok(render(tok, p.turns[:1], []), return_tensors="pt", add_special_tokens=False) for p in prompts]
    methods = {"none": None, **{name: built[name]["drafter"] for name in ("ours (REST)", "ours", "draftretriever")}}
    wrapped = {name: specdec.wrap(model, drafter=d) for name, d in methods.items()}
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
              return_dict_in_generate=True)
    for spec in wrapped.values():  # warm-up, untimed
        spec.generate(encoded[0].input_ids, attention_mask=encoded[0].attention_mask, **{**kw, "max_new_tokens": 4})
    per = {name: [] for name in methods}
    mismatches = {name: 0 for name in methods}
    for i, (p, enc) in enumerate(zip(prompts, encoded)):
        outputs = {}
        for name, spec in wrapped.items():  # interleaved, so load on a shared machine hits all alike
            out = spec.generate(enc.input_ids, attention_mask=enc.attention_mask, **kw)
            s = out.spec_stats
            outputs[name] = out.sequences
            per[name].append({"question_id": p.question_id, "category": p.category, "tokens": sum(s.new_tokens),
                              "steps": sum(len(r) for r in s.accepted_lengths),
                              "accepted": sum(sum(a) - len(a) for a in s.accepted_lengths),
                              "proposed": sum(map(sum, s.proposed)), "wall_s": s.wall_time,
                              "draft_s": s.times.get("draft", 0.0)})
        for name in methods:
            mismatches[name] += int(not torch.equal(outputs[name], outputs["none"]))
        print(f"[{i + 1}/{len(prompts)}] {p.category:<14} " + "  ".join(
            f"{n} tau={r[-1]['tokens'] / r[-1]['steps']:.2f}" for n, r in per.items() if n != "none"), flush=True)

    base_tps = sum(r["tokens"] for r in per["none"]) / sum(r["wall_s"] for r in per["none"])
    summary = {}
    for name, rows in per.items():
        tokens, steps, wall = (sum(r[k] for r in rows) for k in ("tokens", "steps", "wall_s"))
        proposed = sum(r["proposed"] for r in rows)
        info = built.get(name, {})
        summary[name] = {"tau": tokens / steps, "acceptance": sum(r["accepted"] for r in rows) / proposed if proposed
                         else 0.0, "tokens_per_s": tokens / wall, "speedup": tokens / wall / base_tps,
                         "draft_ms_per_step": 1e3 * sum(r["draft_s"] for r in rows) / steps,
                         "mismatches_vs_none": mismatches[name],
                         **{k: v for k, v in info.items() if k != "drafter"}}
    print(f"\nSmolLM2 fp32 CPU, {args.threads} thread(s); {len(prompts)} builtin prompts (first turn), "
          f"{args.max_new_tokens} new tokens, batch 1; corpus {built['index']}: {built['tokens']:,} tokens, "
          f"{built['documents']} documents; num_nodes={args.num_nodes} max_depth={args.max_depth} "
          f"max_suffix={args.max_suffix}\n")
    print("| drafter | τ | acceptance | tok/s | × none | draft ms/step | build s | index MiB (RSS at load) | file MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        mem = "—" if name == "none" else (f"{s['index_mib']:.1f} ({s['rss_mib']:.1f})" if s["index_mib"] is not None
                                         else f"({s['rss_mib']:.1f})")
        build = "—" if name == "none" else f"{s['build_s']:.2f}"
        file = "—" if name == "none" else f"{s['file_mib']:.1f}"
        print(f"| {name} | {s['tau']:.3f} | {s['acceptance']:.1%} | {s['tokens_per_s']:.1f} | {s['speedup']:.2f} | "
              f"{s['draft_ms_per_step']:.2f} | {build} | {mem} | {file} |")
    if any(summary[n]["mismatches_vs_none"] for n in summary):
        print(f"\nWARNING: outputs differ from the no-drafter run: {mismatches}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "corpus": {k: built[k] for k in (
            "index", "tokens", "documents")}, "summary": summary, "per_prompt": per}, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
