"""Attention and KV kernels, each with a pure-torch reference."""
from .attention import masked_attention_reference

__all__ = ["masked_attention_reference"]
