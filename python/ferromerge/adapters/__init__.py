"""LoRA adapters in, one adapter out: ``merge_adapters`` (PEFT's ``add_weighted_adapter`` combination types, without
the base model), on per-module ``Factors``."""

from __future__ import annotations

from .factors import Factors

__all__ = ["Factors"]
