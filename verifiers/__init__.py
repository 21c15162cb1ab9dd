"""Verification: the DraftTree structure and the acceptance rules."""
from .acceptance import GreedyAcceptance, SamplingParams, SpeculativeSampling, StepOutcome, make_acceptance
from .tree import DraftTree

__all__ = ["DraftTree", "GreedyAcceptance", "SamplingParams", "SpeculativeSampling", "StepOutcome", "make_acceptance"]
