"""Attention and KV kernels, each with a pure-torch reference.

The engine uses the references on CPU and the Triton kernels on CUDA.
"""
from .attention import masked_attention_reference
from .block_table import block_table_attention, block_table_attention_op, block_table_reference
from .kv_commit import kv_commit, kv_commit_reference
from .tree_attention import (TreeAttentionConfig, plan_tree_attention, tree_attention, tree_attention_op,
                             tree_attention_reference,
                             tree_visibility)

__all__ = ["masked_attention_reference", "block_table_attention", "block_table_attention_op", "block_table_reference", "tree_attention", "tree_attention_op", "tree_attention_reference", "tree_visibility",
           "TreeAttentionConfig", "plan_tree_attention", "kv_commit", "kv_commit_reference"]
