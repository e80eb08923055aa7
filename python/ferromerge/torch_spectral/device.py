"""Device strings of the torch hand-off (``cpu``, ``cuda``, ``cuda:N``, ``torch:cpu``) and whether torch can serve
one: checked without importing torch, so a config is validated on machines that lack it; torch is imported only
to answer whether it is usable (a broken install is a reason, not a crash)."""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any

from ..errors import ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TorchUnavailableWarning", "check_device", "torch_device", "torch_unavailable_reason"]

_DEVICE_RE = re.compile(r"^(?:cpu|torch:cpu|cuda|cuda:(\d+))$")


class TorchUnavailableWarning(UserWarning):
    """A torch device was asked for but cannot be used; the Rust kernels run instead."""


def check_device(device: str) -> str:
    """Validate a device string without importing torch; returns it unchanged. Raises ``ParameterError``."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ParameterError(
            f"device must be 'cpu' (Rust kernels), 'cuda', 'cuda:N' or 'torch:cpu' (torch on the CPU), got {device!r}"
        )
    return device


def _import_torch() -> tuple[Any, str | None]:
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install 'ferromerge[torch]', with a CUDA build for a GPU)"
    except Exception as e:  # a broken install (missing CUDA libraries, ...) must not stop a CPU merge
        return None, f"torch failed to import ({type(e).__name__}: {e})"
    return torch, None


def torch_unavailable_reason(device: str) -> str | None:
    """Why ``device`` cannot run the torch path (None when it can). ``cpu`` always has a reason: it means the Rust
    kernels. Raises ``ParameterError`` for a malformed device string."""
    check_device(device)
    if device == "cpu":
        return "device 'cpu' runs the Rust kernels"
    torch, why = _import_torch()
    if torch is None:
        return why
    if device == "torch:cpu":
        return None
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return (f"torch {torch.__version__} was built without CUDA" if built is None
                else f"torch {torch.__version__} (CUDA {built}) sees no CUDA device")
    if device != "cuda":
        index = int(device.split(":", 1)[1])
        count = torch.cuda.device_count()
        if index >= count:
            return f"{device} asked for, but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
    return None


def torch_device(device: str, *, warn: bool = False) -> "torch.device | None":
    """The torch device for ``cuda``, ``cuda:N`` or ``torch:cpu``; None for ``cpu`` and when torch or CUDA is
    missing (``torch_unavailable_reason`` says why; with ``warn`` a ``TorchUnavailableWarning`` says it too, so
    the caller can simply fall back to the Rust kernels)."""
    why = torch_unavailable_reason(device)
    if why is not None:
        if warn and device != "cpu":
            warnings.warn(f"{why}; using the Rust kernels instead of {device}", TorchUnavailableWarning,
                          stacklevel=2)
        return None
    import torch

    if device == "torch:cpu":
        return torch.device("cpu")
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)
