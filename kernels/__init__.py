"""Attention and KV kernels, each with a pure-torch reference.

The engine uses the references on CPU and the Triton kernels on CUDA.
"""
if __name__ == "kernels":
    # This folder installs as `specdec.kernels`. It was reached under the bare name `kernels`
    # because a checkout's root is on sys.path (`python -m ...` or `python -c ...` run there), where
    # it would hide Hugging Face's `kernels` package, which transformers>=5.25 imports. Hand the
    # name over to that package, or fail as a missing `kernels` would.
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    finally:
        sys.path[:] = _saved
else:
    from .attention import masked_attention_reference
    from .block_table import block_table_attention, block_table_attention_op, block_table_reference
    from .kv_commit import kv_commit, kv_commit_reference
    from .tree_attention import (TreeAttentionConfig, plan_tree_attention, tree_attention, tree_attention_op,
                                 tree_attention_reference, tree_visibility)

    __all__ = ["masked_attention_reference", "block_table_attention", "block_table_attention_op",
               "block_table_reference", "tree_attention", "tree_attention_op", "tree_attention_reference",
               "tree_visibility", "TreeAttentionConfig", "plan_tree_attention", "kv_commit", "kv_commit_reference"]
