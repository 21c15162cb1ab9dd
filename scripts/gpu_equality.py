"""On the GPU: tiny models in fp32 must equal HF greedy exactly; in bf16 every divergence must
start at a near-tie of the target's top-2 logits.

For each bf16 mismatch we report the first differing position, the HF reference's top-2 logit
margin there (from HF's own forward on the reference prefix), the bf16 spacing (ulp) at that
logit's magnitude, and whether specdec's token is the runner-up.

    source scripts/device_env.sh; python3 scripts/gpu_equality.py
"""
import math
import sys

import torch

sys.path.insert(0, "tests")
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch  # noqa: E402

import specdec  # noqa: E402
from specdec.drafters import DraftModel, PromptLookup  # noqa: E402


def bf16_ulp(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


def divergences(model, ids, mask, ref, out):
    """Yield (row, position, margin, ulp, is_runner_up) for each row whose tokens differ."""
    t0 = ids.shape[1]
    for r in range(ref.shape[0]):
        diff = (ref[r, t0:] != out[r, t0:]).nonzero()
        if not len(diff):
            continue
        pos = int(diff[0])
        prefix = ref[r : r + 1, : t0 + pos]
        with torch.no_grad():
            logits = model(prefix, attention_mask=torch.cat([mask[r : r + 1], torch.ones_like(prefix[:, t0:])], 1)
                           ).logits[0, -1].float()
        top = logits.topk(2)
        margin = float(top.values[0] - top.values[1])
        yield r, pos, margin, bf16_ulp(float(top.values[0])), int(out[r, t0 + pos]) == int(top.indices[1])


bad = 0
for dtype in (torch.float32, torch.bfloat16):
    for arch in ARCHS:
        model = make_tiny(arch).to("cuda", dtype)
        ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=4)
        ids, mask = ids.cuda(), mask.cuda()
        ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
        drafters = {"none": None, "lookup": PromptLookup(4),
                    "draft": DraftModel(make_tiny(arch, seed=1).to("cuda", dtype), 3),
                    "tree": DraftModel(model, 4, tree_width=2, tree_nodes=8), "branches": PromptLookup(3, num_branches=3),
                    "graphed": None, "graphed_lookup": PromptLookup(4)}
        res = []
        for name, d in drafters.items():
            out = specdec.wrap(model, drafter=d, cuda_graphs=name.startswith("graphed")).generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0,
                                                         eos_token_id=None, return_dict_in_generate=True)
            same = torch.equal(out.sequences, ref)
            res.append(f"{name}={'==' if same else '!='} tau={out.spec_stats.tau:.2f}")
            if not same and dtype == torch.float32:
                bad += 1
            for r, pos, margin, ulp, runner_up in ([] if same else divergences(model, ids, mask, ref, out.sequences)):
                near = margin <= 2 * ulp
                bad += int(not (near and runner_up))
                print(f"  {arch}/{name} row {r}: first divergence at new token {pos}; top-2 margin {margin:.4g} "
                      f"= {margin / ulp:.2f} bf16 ulp; specdec took the runner-up: {runner_up}; near-tie: {near}")
        print(str(dtype).split(".")[1], arch, " ".join(res), flush=True)
print("ALL DIVERGENCES AT NEAR-TIES" if bad == 0 else f"{bad} UNEXPLAINED DIVERGENCES")
sys.exit(1 if bad else 0)
