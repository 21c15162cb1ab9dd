"""DraftTree compiles to the right ancestors, depths and paths; rules pick the right paths."""
import pytest
import torch

from specdec.verifiers import DraftTree, GreedyAcceptance, SamplingParams, SpeculativeSampling
from specdec.verifiers.acceptance import warp_probs


def test_chain_compiles_to_lower_triangle():
    tree = DraftTree.chain(torch.tensor([[5, 7, 9]]))
    assert tree.parents.tolist() == [[-1, 0, 1]]
    assert torch.equal(tree.ancestors[0], torch.ones(3, 3, dtype=torch.bool).tril())
    assert tree.depth.tolist() == [[1, 2, 3]]


def test_chain_validity_is_a_prefix():
    tree = DraftTree.chain(torch.tensor([[5, 7, 9]]), valid=torch.tensor([[True, False, True]]))
    assert tree.valid.tolist() == [[True, False, False]]


def test_template_tree():
    #      root
    #     /    \
    #    0      3
    #   / \
    #  1   2
    tree = DraftTree.from_paths([[0, 1], [0, 2], [3]], torch.tensor([[10, 11, 12, 13]]))
    assert tree.parents.tolist() == [[-1, 0, 0, -1]]
    assert tree.depth.tolist() == [[1, 2, 2, 1]]
    assert tree.ancestors[0, 2].tolist() == [True, False, True, False]
    assert tree.path_to(torch.tensor([2]), 4).tolist() == [[0, 2, -1, -1]]
    assert tree.path_to(torch.tensor([-1]), 4).tolist() == [[-1, -1, -1, -1]]


def test_template_rejects_two_parents():
    with pytest.raises(ValueError, match="two parents"):
        DraftTree.from_paths([[0, 2], [1, 2]], torch.zeros(1, 3, dtype=torch.long))


def one_hot_logits(argmaxes, vocab=16):
    logits = torch.zeros(1, len(argmaxes), vocab)
    for i, a in enumerate(argmaxes):
        logits[0, i, a] = 5.0
    return logits


def test_greedy_chain_literal():
    tree = DraftTree.chain(torch.tensor([[1, 5, 3, 4]]))
    # Target argmax at root, after node 0, 1, 2, 3:  1, 5, 9, 4, 7  -> mismatch at node 2.
    out = GreedyAcceptance().accept(one_hot_logits([1, 5, 9, 4, 7]), tree, SamplingParams())
    assert out.accept_len.tolist() == [2]
    assert out.next_token.tolist() == [9]  # the target's own token where the draft failed
    tokens, count = out.emitted()
    assert tokens[0, : count[0]].tolist() == [1, 5, 9]


def test_greedy_tree_picks_deepest_matching_branch():
    tree = DraftTree.from_paths([[0, 1], [0, 2], [3]], torch.tensor([[4, 6, 8, 4]]))
    # root -> 4 ; after node 0 -> 8 ; after node 2 -> 11. Node 2 (token 8) matches, node 1 does not.
    logits = one_hot_logits([4, 8, 0, 11, 0])
    out = GreedyAcceptance().accept(logits, tree, SamplingParams())
    assert out.accept_len.tolist() == [2]
    assert out.path[0, :2].tolist() == [0, 2]
    assert out.next_token.tolist() == [11]


def test_all_accepted_gives_bonus_token():
    tree = DraftTree.chain(torch.tensor([[1, 2]]))
    out = GreedyAcceptance().accept(one_hot_logits([1, 2, 3]), tree, SamplingParams())
    assert out.accept_len.tolist() == [2] and out.next_token.tolist() == [3]


def test_sampling_point_mass_certain_accept_and_reject():
    tree = DraftTree.chain(torch.tensor([[1, 2]]))
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 1] = 0.0  # p(1) = 1 at the root: node 0 always accepted
    logits[0, 1, 3] = 0.0  # p(3) = 1 after node 0: node 1 (token 2) always rejected
    out = SpeculativeSampling().accept(logits, tree, SamplingParams(do_sample=True))
    assert out.accept_len.tolist() == [1] and out.next_token.tolist() == [3]


def test_warp_top_k_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert (warp_probs(logits, SamplingParams(True, top_k=2)) > 0).tolist() == [[True, True, False, False]]
    p = warp_probs(logits, SamplingParams(True, top_p=0.5))
    assert (p > 0).tolist() == [[True, False, False, False]]
