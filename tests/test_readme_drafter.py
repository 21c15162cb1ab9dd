"""The README's "Write your own drafter" example, run as written: it must stay a lossless drafter.

The code blocks are read from README.md itself, so editing the example without keeping it
correct fails here.
"""
import re
from pathlib import Path

import pytest
import torch

import specdec
from specdec.drafters import Drafter
from specdec.drafters.base import DecodeContext
from tiny import hf_greedy, make_tiny, ragged_batch

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### Write your own drafter"


def section_blocks() -> list[str]:
    """The ```python blocks of the README section, in order."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"\n#{2,3} ", body, maxsplit=1)[0]  # up to the next heading
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def readme_drafter() -> type:
    """Execute the section's first block and return the one Drafter subclass it defines."""
    blocks = section_blocks()
    assert len(blocks) >= 2, "the section needs the drafter's code and a usage block"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md:drafter", "exec"), namespace)
    classes = [v for v in namespace.values()
               if isinstance(v, type) and issubclass(v, Drafter) and v.__module__ == "readme_example"]
    assert len(classes) == 1, f"the example should define exactly one drafter, found {classes}"
    return classes[0]


def state_of(rows: list[list[int]], pad: int = 0) -> DecodeContext:
    """A host-side DecodeState over left-padded rows (enough for a drafter that reads tokens only)."""
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    start = torch.tensor([width - len(r) for r in rows])
    return DecodeContext(target=None, tokens=tokens, seq_len=torch.full((len(rows),), width), start=start,
                         params=None, max_seq_len=width, capacity=width, cache=None)


def test_proposes_the_bigram_chain():
    cls = readme_drafter()
    # Row 0: root 5; 5 was followed by 6, 6 by 7, 7 by 5: the chain 6 7 5 6.
    # Row 1: root 9 never occurred before: nothing valid. The padding 0s (before start) never match.
    tree = cls(num_tokens=4).propose(state_of([[5, 6, 7, 5], [9]]))
    assert tree.num_nodes == 4 and tree.parents[0].tolist() == [-1, 0, 1, 2]
    assert tree.tokens[0].tolist() == [6, 7, 5, 6] and tree.valid[0].all()
    assert not tree.valid[1].any()
    # The latest occurrence wins: after 3, "3 4 ... 3 8 ... 3" drafts 8, not 4.
    tree = cls(num_tokens=1).propose(state_of([[3, 4, 1, 3, 8, 1, 3]]))
    assert tree.tokens.tolist() == [[8]] and tree.valid.tolist() == [[True]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_steps", [1, 4])
def test_greedy_equals_hf(arch, chunk_steps):
    """Token-identical to HF greedy at batch 1 and on a ragged batch of 4, and some drafts accepted
    (so the equality covers accepted tokens, not only plain decoding)."""
    cls = readme_drafter()
    model = make_tiny(arch, vocab_size=64, seed=3)
    spec = specdec.wrap(model, drafter=cls(num_tokens=4), chunk_steps=chunk_steps)
    accepted = 0
    for lengths in ([7], [5, 12, 3, 9]):
        ids, mask = ragged_batch(lengths, 64, seed=len(lengths))
        out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
        want = hf_greedy(model, ids, attention_mask=mask, max_new_tokens=40)
        assert torch.equal(out.sequences, want), lengths
        stats = out.spec_stats
        assert stats.drafter == cls.__name__ and stats.lossless
        accepted += sum(sum(a) - len(a) for a in stats.accepted_lengths)
    assert accepted > 0, "no draft token was ever accepted: the test would not exercise acceptance"


def test_usage_block_runs():
    """The section's second block, with ``model`` and ``enc`` bound as the README's first example binds them."""
    cls = readme_drafter()
    model = make_tiny("llama", vocab_size=64, seed=3)
    ids, mask = ragged_batch([6, 10], 64, seed=5)
    namespace = {"specdec": specdec, "model": model, cls.__name__: cls,
                 "enc": {"input_ids": ids, "attention_mask": mask}}
    model.generation_config.pad_token_id = 0
    usage = section_blocks()[1]
    exec(compile(usage, "README.md:usage", "exec"), namespace)
    new_tokens = int(re.search(r"max_new_tokens=(\d+)", usage).group(1))
    want = hf_greedy(model, ids, attention_mask=mask, max_new_tokens=new_tokens)
    assert torch.equal(namespace["out"].sequences, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_inside_cuda_graphs():
    """The example declares itself device-only; under captured CUDA graphs it must still equal HF."""
    cls = readme_drafter()
    model = make_tiny("llama", vocab_size=64, seed=3).cuda()
    spec = specdec.wrap(model, drafter=cls(num_tokens=4), cuda_graphs=True)
    ids, mask = ragged_batch([5, 12, 3, 9], 64, seed=4)
    ids, mask = ids.cuda(), mask.cuda()
    out = spec.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hf_greedy(model, ids, attention_mask=mask, max_new_tokens=40))
