"""Random-init head drafters for tests, free of the training stack (hydra, datasets), so that the
GPU machine, which has neither, can run the tests that use them."""
import torch

import specdec
from specdec.drafters import EagleHead, KangarooAdapter, MedusaHeads
from specdec.drafters.heads import EagleHeadModel, MedusaHeadsModel
from specdec.drafters.kangaroo_adapter import KangarooAdapterModel

AUX = (0, 1, 1)  # the embedding output and layer 1 twice: a 2-layer target has few layers to read


def noisy(module, scale=0.05, seed=3):
    """Random-init heads: perturb every weight so drafts are neither the target's nor constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))  # CPU draws: same noise on any device
    return module


def eagle(model, num_tokens=3, vocab=None):
    return EagleHead(noisy(EagleHeadModel.from_target(model, AUX, draft_vocab=vocab)), num_tokens=num_tokens)


def medusa(model, num_heads=3, tree=None):
    return MedusaHeads(noisy(MedusaHeadsModel.from_target(model, num_heads)), tree=tree)


def kangaroo(model, num_tokens=3, stop_threshold=None, exit_layer=1, scale=0.05):
    return KangarooAdapter(noisy(KangarooAdapterModel.from_target(model, exit_layer), scale), num_tokens=num_tokens,
                           stop_threshold=stop_threshold)


def recording(drafter):
    """Record (committed tokens of row 0, drafted tokens of row 0) at every propose."""
    seen, propose = [], drafter.propose

    def record(state):
        tree = propose(state)
        seen.append((state.tokens[0, state.start[0]:state.seq_len[0]].clone(), tree.tokens[0].clone()))
        return tree
    drafter.propose = record
    return seen


def generate(model, drafter, ids, mask=None, n=24, eos=None, chunk_steps=1, **wrap):
    return specdec.wrap(model, drafter=drafter, chunk_steps=chunk_steps, **wrap).generate(
        ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos,
        return_dict_in_generate=True)
