"""Where a generate call's time goes beyond its decode steps (issue 6): per prompt length, the
prefill, the chunks' device time and the rest, for the graphed no-drafter path at batch 1, with
``bucket_prefill`` off and on. Compare ``wall_ms``: with the prefill replayed as a graph,
``prefill_ms`` (host time) no longer includes the device's share.

    SPECDEC_GGUF_DIR=/tmp/stage python scripts/gpu_overhead.py
"""
from __future__ import annotations

import json
import time

import torch

import specdec
from gpu_fast import builtin   # scripts/ is on sys.path when a script runs
from specdec.bench.prompts import render


def main() -> None:
    model, tok = specdec.load_model("zoo:smollm2-135m-instruct", dtype="bfloat16", device="cuda")
    for bucket in (False, True):
        print(f"bucket_prefill={bucket}", flush=True)
        measure(specdec.wrap(model, cuda_graphs=True, bucket_prefill=bucket), tok)


def measure(spec, tok) -> None:
    for p in builtin(["editing", "summarization"], 1):
        text = render(tok, p["turns"][:1], [])
        enc = tok([text], return_tensors="pt", add_special_tokens=False)
        ids, mask = enc.input_ids.cuda(), enc.attention_mask.cuda()
        for new in (1, 8, 256):
            kw = dict(attention_mask=mask, max_new_tokens=new, eos_token_id=None, do_sample=False,
                      return_dict_in_generate=True)
            spec.generate(ids, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = spec.generate(ids, **kw)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            st = out.spec_stats
            print(json.dumps({"prompt_tokens": ids.shape[1], "new": new, "steps": st.num_steps, "wall_ms": 1e3 * wall,
                              "prefill_ms": 1e3 * st.prefill_time,
                              "phases_ms": {k: round(1e3 * v, 3) for k, v in st.times.items()}}), flush=True)
        # The prefill alone, eager, as the engine runs it: one forward over the prompt.
        runner, n = spec.engine.runner, ids.shape[1] - 1
        cache = runner.new_cache(1, 1024)
        slots = torch.arange(n, device=ids.device).unsqueeze(0)
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril().unsqueeze(0)
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            runner.forward(cache, ids[:, :n], slots, slots, causal, view_len=n, compute_logits=False)
            host = time.perf_counter() - t
            torch.cuda.synchronize()
            total = time.perf_counter() - t
        print(json.dumps({"prefill_tokens": n, "host_launch_ms": 1e3 * host, "total_ms": 1e3 * total}), flush=True)


if __name__ == "__main__":
    main()
