"""Drafters: everything that proposes tokens for the target to verify.

Every drafter subclasses ``specdec.drafters.base.Drafter`` and declares a ``DraftSpec``. Build one
directly, by registered name with ``make_drafter``, or from a Hydra-style mapping with
``build_drafter``.
"""
from __future__ import annotations

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


class UnregisteredDrafterTarget(ValueError):
    """A config's ``_target_`` names something that is not a registered drafter (nothing was imported or run)."""


def register_drafter(name: str, factory) -> None:
    """Make ``factory`` (a Drafter class, or a classmethod that builds one) buildable by name and by
    ``_target_``: ``register_drafter("mine", MyDrafter)`` allows ``{"name": "mine"}`` and
    ``{"_target_": "mypkg.MyDrafter"}``. Configs can name nothing else."""
    if not callable(factory):
        raise TypeError(f"register_drafter({name!r}, ...): the factory must be callable, got {type(factory).__name__}")
    DRAFTERS[name] = factory


def _target_paths(factory) -> set[str]:
    """The dotted paths a config may use for ``factory``: its defining module's, and for our own
    drafters the package's (``specdec.drafters.PromptLookup``)."""
    own = f"{factory.__module__}.{factory.__qualname__}"
    return {own, f"{__name__}.{factory.__qualname__}"} if own.startswith(f"{__name__}.") else {own}


def allowed_targets() -> dict[str, object]:
    """``_target_`` path -> factory, for every registered drafter and every exported Drafter class."""
    exported = [obj for obj in map(globals().get, __all__)
                if isinstance(obj, type) and issubclass(obj, Drafter) and obj is not Drafter]
    return {path: factory for factory in (*DRAFTERS.values(), *exported) for path in _target_paths(factory)}


def make_drafter(name: str, **kwargs):
    """Example: ``make_drafter("lookup", num_tokens=8)``; ``"none"`` gives None (no drafter)."""
    if name in (None, "none"):
        return None
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; known drafters: {', '.join(sorted(DRAFTERS))} (or 'none')")
    return DRAFTERS[name](**kwargs)


def resolve_target(path: str):
    """The registered factory a ``_target_`` names. The path is looked up, never imported, so a config
    cannot run arbitrary code (``os.system``); anything unregistered raises UnregisteredDrafterTarget."""
    allowed = allowed_targets()
    if not isinstance(path, str) or path not in allowed:
        shown = sorted(p for p in allowed if not p.startswith(f"{__name__}.") or p.split(".")[2][:1].isupper())
        raise UnregisteredDrafterTarget(
            f"drafter _target_ {path!r} is not a registered drafter, so it was not imported or called. "
            f"Use one of: {', '.join(shown)}; or pick a config group (drafter=lookup) or a name "
            f"(drafter.name=lookup). A drafter of your own must first be registered with "
            f"specdec.drafters.register_drafter(name, factory).")
    return allowed[path]


def build_drafter(cfg: Mapping | None, target=None):
    """Build from a config mapping: ``{"_target_": "specdec.drafters.PromptLookup", "num_tokens": 4}``
    or ``{"name": "lookup", ...}``. A missing/None target or name ``none`` means no drafter.
    ``_target_`` must name a registered drafter (see ``resolve_target``).
    ``target`` (the target model) is accepted for drafters that derive from it."""
    if cfg is None:
        return None
    cfg = {k: v for k, v in dict(cfg).items()}
    path = cfg.pop("_target_", None)
    name = cfg.pop("name", None)
    if path is None:
        return make_drafter(name, **cfg)
    fn = resolve_target(path)
    if getattr(fn, "needs_target", False):
        cfg["target"] = target
    return fn(**cfg)


__all__ = ["CopySpec", "DecodeContext", "DraftSpec", "Drafter", "NullDrafter", "DraftModel", "EagleHead", "KangarooAdapter",
           "MedusaHeads", "RestDrafter", "DynamicExit", "LayerSkip", "PromptLookup", "Rapid", "Swift", "SparseSelfDraft",
           "Hierarchical", "TriForce",
           "VocabularyMismatchError",
           "build_drafter", "make_drafter", "register_drafter", "resolve_target", "allowed_targets",
           "UnregisteredDrafterTarget", "DRAFTERS"]
