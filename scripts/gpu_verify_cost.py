"""Target step time against the number of verified tree nodes, on the GPU.

Builds a random-init model with a real model's shapes (default: Qwen2.5-1.5B; timing depends
on shapes, not weights), fills a prefix, then times one verification forward of N query
tokens (root + N - 1 nodes) through specdec's runner, eager and captured as a CUDA graph, with
the Triton tree-attention kernel and with the torch reference (dense mask + SDPA).

    python scripts/gpu_verify_cost.py --nodes 1 4 8 16 32 64 --prefix 512
"""
from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from specdec.runner import ModelRunner

SHAPES = {
    "qwen2.5-1.5b": (Qwen2Config, dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2.5-0.5b": (Qwen2Config, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True)),
    "smollm2-135m": (LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                       tie_word_embeddings=True)),
}


def time_ms(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cls, kw = SHAPES[args.model]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(max_position_embeddings=4096, **kw), dtype=torch.bfloat16).cuda().eval()
    runner = ModelRunner(model)
    b, dev = args.batch, "cuda"
    cap = args.prefix + max(args.nodes) + 8
    cache = runner.new_cache(b, cap)
    slots = torch.arange(args.prefix, device=dev).expand(b, -1)
    tokens = torch.randint(0, kw["vocab_size"], (b, args.prefix), device=dev)
    causal = torch.ones(args.prefix, args.prefix, dtype=torch.bool, device=dev).tril().expand(b, -1, -1)
    runner.forward(cache, tokens, slots, slots, causal, view_len=args.prefix, compute_logits=False)
    cache.lengths.fill_(args.prefix)
    rows = []
    for n in args.nodes:
        q = n  # root + (n - 1) draft nodes; n = 1 is plain decoding
        tok = torch.randint(0, kw["vocab_size"], (b, q), device=dev)
        s = args.prefix + torch.arange(q, device=dev).expand(b, q)
        among = torch.ones(q, q, dtype=torch.bool, device=dev).tril().expand(b, q, q)
        view = args.prefix + q

        def step():
            return runner.forward(cache, tok, s, s, among, view_len=view, contiguous=True).logits

        row = dict(model=args.model, batch=b, prefix=args.prefix, query_tokens=q)
        for backend in ("triton", "reference"):
            runner.attention = backend
            row[f"{backend}_eager_ms"] = time_ms(step)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                step()
            row[f"{backend}_graph_ms"] = time_ms(graph.replay)
        rows.append(row)
        print(json.dumps(row), flush=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n{args.model}, batch {b}, prefix {args.prefix}, bf16; weight bytes {weights / 1e9:.2f} GB "
          f"(bandwidth floor at 3.35 TB/s: {weights / 3.35e12 * 1e3:.2f} ms)")
    print("| query tokens | triton eager ms | triton graph ms | reference eager ms | reference graph ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['query_tokens']} | {r['triton_eager_ms']:.2f} | {r['triton_graph_ms']:.2f} "
              f"| {r['reference_eager_ms']:.2f} | {r['reference_graph_ms']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
