"""On the GPU: tiny models in fp32 must equal HF greedy exactly; report bf16 agreement too."""
import sys

import torch

sys.path.insert(0, "tests")
from tiny import ARCHS, hf_greedy, make_tiny, ragged_batch  # noqa: E402

import specdec  # noqa: E402
from specdec.drafters import DraftModel, PromptLookup  # noqa: E402

for dtype in (torch.float32, torch.bfloat16):
    for arch in ARCHS:
        model = make_tiny(arch).to("cuda", dtype)
        ids, mask = ragged_batch([3, 9, 1, 6], model.config.vocab_size, seed=4)
        ids, mask = ids.cuda(), mask.cuda()
        ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
        drafters = {"none": None, "lookup": PromptLookup(4), "draft": DraftModel(make_tiny(arch, seed=1).to("cuda", dtype), 3),
                    "tree": DraftModel(model, 4, tree_width=2, tree_nodes=8), "branches": PromptLookup(3, num_branches=3)}
        res = []
        for name, d in drafters.items():
            out = specdec.wrap(model, drafter=d).generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0,
                                                         eos_token_id=None, return_dict_in_generate=True)
            res.append(f"{name}={'==' if torch.equal(out.sequences, ref) else '!='} tau={out.spec_stats.tau:.2f}")
        print(str(dtype).split(".")[1], arch, " ".join(res), flush=True)
