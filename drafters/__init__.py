"""Drafters: everything that proposes tokens for the target to verify.

Every drafter subclasses ``specdec.drafters.base.Drafter`` and declares a ``DraftSpec``. Build one
directly, by registered name with ``make_drafter``, or from a Hydra-style mapping with
``build_drafter``.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from .base import DecodeContext, DraftSpec, Drafter, NullDrafter, VocabularyMismatchError
from .copyspec import CopySpec
from .draft_model import DraftModel
from .dynamic_exit import DynamicExit
from .head_drafters import EagleHead, MedusaHeads
from .kangaroo_adapter import KangarooAdapter
from .layerskip import LayerSkip
from .lookup import PromptLookup
from .rapid import Rapid
from .rest import RestDrafter
from .swift import Swift
from .sparse_kv import SparseSelfDraft
from .hierarchical import Hierarchical, TriForce

DRAFTERS = {
    "lookup": PromptLookup,
    "prompt_lookup": PromptLookup,
    "draft_model": DraftModel.from_pretrained,
    "layerskip": LayerSkip,
    "kangaroo": LayerSkip.kangaroo,
    "swift": Swift,
    "sparse_self": SparseSelfDraft,
    "triforce": TriForce,
    "del": DynamicExit,
    "dynamic_exit": DynamicExit,
    "copyspec": CopySpec,
    "rest": RestDrafter.from_index,
    "rapid": Rapid,
    "eagle": EagleHead.from_pretrained,
    "medusa": MedusaHeads.from_pretrained,
    "kangaroo_adapter": KangarooAdapter.from_pretrained,
}


def make_drafter(name: str, **kwargs):
    """Example: ``make_drafter("lookup", num_tokens=8)``; ``"none"`` gives None (no drafter)."""
    if name in (None, "none"):
        return None
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; known drafters: {', '.join(sorted(DRAFTERS))} (or 'none')")
    return DRAFTERS[name](**kwargs)


def _locate(path: str):
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        if "." in module:  # a classmethod such as package.Class.method
            return getattr(_locate(module), attr)
        raise


def build_drafter(cfg: Mapping | None, target=None):
    """Build from a config mapping: ``{"_target_": "specdec.drafters.PromptLookup", "num_tokens": 4}``
    or ``{"name": "lookup", ...}``. A missing/None target or name ``none`` means no drafter.
    ``target`` (the target model) is accepted for drafters that derive from it."""
    if cfg is None:
        return None
    cfg = {k: v for k, v in dict(cfg).items()}
    path = cfg.pop("_target_", None)
    name = cfg.pop("name", None)
    if path is None:
        return make_drafter(name, **cfg)
    fn = _locate(path)
    if getattr(fn, "needs_target", False):
        cfg["target"] = target
    return fn(**cfg)


__all__ = ["CopySpec", "DecodeContext", "DraftSpec", "Drafter", "NullDrafter", "DraftModel", "EagleHead", "KangarooAdapter",
           "MedusaHeads", "RestDrafter", "DynamicExit", "LayerSkip", "PromptLookup", "Rapid", "Swift", "SparseSelfDraft",
           "Hierarchical", "TriForce",
           "VocabularyMismatchError",
           "build_drafter", "make_drafter", "DRAFTERS"]
