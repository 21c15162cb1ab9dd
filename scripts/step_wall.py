"""Where a drafted captured step's wall time goes: wall vs kernel time per step and idle steps (H200, SmolLM2, bf16).
    python3 scripts/step_wall.py OUT.json none lookup:num_tokens=8 eagle:num_tokens=4"""
import inspect, json, sys, time
from pathlib import Path
import torch
import specdec
from specdec.bench.command import parse_spec
from specdec.bench.core import load_cached
from specdec.bench.prompts import builtin, render, select
from specdec.drafters import DRAFTERS, build_drafter

out = Path(sys.argv[1]); specs = sys.argv[2:]
model, tok = load_cached("zoo:smollm2-135m-instruct", "bfloat16", "cuda")
prompts = select(builtin(), num_prompts=6)
texts = [render(tok, p.turns[:1], []) for p in prompts]
res = {}
def build(text):
    name, params = parse_spec(text)
    if name == "none":
        return None
    spec = {"name": name, **params}
    acc = inspect.signature(DRAFTERS[name]).parameters
    spec |= {k: v for k, v in (("dtype", "bfloat16"), ("device", "cuda"), ("target", model)) if k in acc and k not in spec}
    return build_drafter(spec, target=model)
for text in specs:
    row = {}
    try:
        spec = specdec.wrap(model, drafter=build(text), cuda_graphs=True, compile=True)
        kw = dict(max_new_tokens=128, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None,
                  return_dict_in_generate=True)
        t0 = time.perf_counter()
        enc = [tok(t, return_tensors="pt").to("cuda") for t in texts]
        spec.generate(**enc[0], **kw); torch.cuda.synchronize(); row["first_s"] = time.perf_counter() - t0
        per = []
        for e in enc:
            spec.generate(**e, **kw); torch.cuda.synchronize()
            t0 = time.perf_counter(); o = spec.generate(**e, **kw); torch.cuda.synchronize(); w = time.perf_counter() - t0
            st = o.spec_stats
            used = len(st.accepted_lengths[0])
            per.append(dict(wall=w, prefill=st.prefill_time, steps_run=st.num_steps, steps_used=used,
                            new=st.new_tokens[0], times=st.times))
        row["prompts"] = per
        W = sum(p["wall"] - p["prefill"] for p in per); N = sum(p["new"] for p in per)
        row["tok_s"] = N / sum(p["wall"] for p in per)
        row["ms_per_step_run"] = 1e3 * W / sum(p["steps_run"] for p in per)
        row["ms_per_step_used"] = 1e3 * W / sum(p["steps_used"] for p in per)
        row["tau"] = N / sum(p["steps_used"] for p in per)
        row["waste_frac"] = 1 - sum(p["steps_used"] for p in per) / sum(p["steps_run"] for p in per)
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            o = spec.generate(**enc[1], **kw); torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
        k = {}
        for e in ev:
            d = k.setdefault(e.name, [0, 0.0]); d[0] += 1; d[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        tot = sum(v[1] for v in k.values())
        row["prof_steps_run"] = o.spec_stats.num_steps
        row["kernels"] = sum(v[0] for v in k.values()); row["kernel_us"] = tot
        row["kernels_per_step"] = row["kernels"] / o.spec_stats.num_steps
        row["kernel_us_per_step"] = tot / o.spec_stats.num_steps
        row["top"] = sorted(([n[:90], c, round(t, 1)] for n, (c, t) in k.items()), key=lambda x: -x[2])[:25]
        try:
            row["step_profile"] = spec.engine.step_profile()
        except Exception as e:
            row["step_profile"] = repr(e)[:300]
    except Exception as e:
        import traceback; row["error"] = traceback.format_exc()[-2000:]
    res[text] = row
    print(text, {k: v for k, v in row.items() if k not in ("prompts", "top")}, flush=True)
    out.write_text(json.dumps(res, indent=1, default=str))
