"""LoRA adapters in, one adapter out: ``merge_adapters`` (PEFT's ``add_weighted_adapter`` combination types, without
the base model, one module at a time), on per-module ``Factors``."""

from __future__ import annotations

from .factors import Factors
from .merge import COMBINATIONS, merge_adapters

__all__ = ["COMBINATIONS", "Factors", "merge_adapters"]
