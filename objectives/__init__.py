"""Pretraining objectives, looked up by name: ``objectives.get("mae", mask_ratio=0.75)``."""
from __future__ import annotations

import dataclasses

from objectives.base import (ImageObjective, Objective, StepContext, cosine_momentum, ema,
                             patchify, unpatchify)
from objectives.bart import BART
from objectives.causal import CLM, MEAP, PrefixLM
from objectives.contrastive import CLIP, PairObjective, SigLIP, SimCLR
from objectives.dcpt import DCPT, MaskDCPT, Restore
from objectives.distill import BYOL, DINO
from objectives.feature_mimic import FeatureMimic
from objectives.mae import MAE
from objectives.mlm import MLM
from objectives.position import Position, TokenPosition
from objectives.selfie import Selfie
from objectives.span_corruption import SpanCorruption
from objectives.text_base import Seq2SeqObjective, TextObjective
from objectives.ul2 import UL2

_OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (MAE, Position, Selfie, SimCLR, BYOL, DINO, DCPT, MaskDCPT,
                              Restore, MLM, SpanCorruption, BART, UL2, CLM, PrefixLM, MEAP,
                              TokenPosition, CLIP, SigLIP, FeatureMimic)}


def names(modality: str | None = None) -> tuple[str, ...]:
    """Known objective names, optionally only those of one modality ("image", ...)."""
    return tuple(n for n, cls in _OBJECTIVES.items() if modality in (None, cls.modality))


def suite_names(suite: str) -> tuple[str, ...]:
    """The objectives ``zoo compare --suite SUITE`` pretrains ("image", "text", "restoration",
    "retrieval")."""
    return tuple(n for n, cls in _OBJECTIVES.items() if cls.suite == suite)


def modality_of(name: str) -> str:
    """The modality ("image", "text", ...) of objective ``name``."""
    if name not in _OBJECTIVES:
        raise ValueError(f"objective.name: unknown {name!r}; known objectives: {names()}")
    return _OBJECTIVES[name].modality


def defaults_of(name: str) -> dict:
    """The default hyperparameters of objective ``name`` (field -> default)."""
    modality_of(name)   # unknown names fail here
    return {f.name: f.default for f in dataclasses.fields(_OBJECTIVES[name])
            if f.default is not dataclasses.MISSING}


def get(name: str, **hparams) -> Objective:
    """Returns the objective ``name`` with the given hyperparameters.

    Raises a one-line ValueError listing what exists for an unknown name or hyperparameter.
    """
    if name not in _OBJECTIVES:
        raise ValueError(f"objective.name: unknown {name!r}; known objectives: {names()}")
    cls = _OBJECTIVES[name]
    allowed = tuple(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"objective {name!r}: unknown hyperparameter {unknown[0]!r}; "
                         f"allowed: {', '.join(allowed)}")
    return cls(**hparams)


__all__ = ["BART", "BYOL", "CLIP", "CLM", "DCPT", "DINO", "FeatureMimic", "ImageObjective", "MAE", "MEAP", "MLM", "MaskDCPT",
           "Objective", "PairObjective", "Position", "PrefixLM", "Restore", "Selfie", "Seq2SeqObjective", "SigLIP", "SimCLR",
           "SpanCorruption", "StepContext", "TextObjective", "TokenPosition", "UL2", "cosine_momentum", "ema", "get", "modality_of",
           "names", "patchify", "suite_names", "unpatchify"]
