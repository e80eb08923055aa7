"""One module of a LoRA adapter: ``Factors(a, b, scale)`` with ΔW = scale · b @ a.

``a`` is float32 [r, in], ``b`` float32 [out, r] (PEFT's ``lora_A`` / ``lora_B``; for an embedding
``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r], so ΔW is in the same B·A orientation and the model
applies it transposed). ``scale`` is PEFT's scaling: lora_alpha / r, or lora_alpha / √r with ``use_rslora``.
Everything that combines adapters works on these, so how an adapter is stored stays in ``adapters.peft_io``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Factors"]


@dataclass(frozen=True)
class Factors:
    """ΔW = ``scale`` · ``b`` @ ``a``: ``a`` float32 [r, in], ``b`` float32 [out, r]."""

    a: npt.NDArray[np.float32]
    b: npt.NDArray[np.float32]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LoRA factors need a [r, in] and b [out, r], got a {list(self.a.shape)} and "
                             f"b {list(self.b.shape)}")

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of ΔW = b @ a: (out, in)."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def delta(self) -> npt.NDArray[np.float32]:
        """ΔW = scale · b @ a in float32 (the full out × in matrix: only where an elementwise step needs it)."""
        out = np.matmul(self.b, self.a)
        out *= np.float32(self.scale)  # in place: one out × in matrix at a time, not two
        return out
