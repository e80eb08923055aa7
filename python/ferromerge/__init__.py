"""ferromerge: Rust-accelerated, streaming merges of LLM weights with mergekit's methods and YAML configs.

``run`` merges the models of a mergekit YAML config into an output directory, and ``plan`` checks such a config
and predicts the run's disk, memory and time without writing anything; ``merge_tensors`` and
``merge_state_dicts`` merge in memory; ``extract_lora`` factors a fine-tune's difference from its base into a
LoRA adapter; ``merge_adapters`` merges LoRA adapters into one adapter; ``compress`` and ``decompress`` store a
family of fine-tunes as task-vector archives.

The public names load on first use (PEP 562's module ``__getattr__``), not when the package is imported: every
``ferromerge`` command imports this package first, and it must reach ``cli.main``, which turns a Ctrl-C during
start-up into one line and exit 130, before the heavy imports (NumPy, the engine, the methods) begin; it also
keeps ``ferromerge --help`` from loading what the command does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the names below are, for type checkers; at run time ``__getattr__`` imports them
    from ._compress import compress, decompress
    from ._extract_lora import extract_lora
    from ._run import PlanReport, RunReport, plan, run
    from .adapters import merge_adapters
    from .errors import CompatWarning, ConfigError, InputError, MergeError, OutputError, ParameterError
    from .tensors import merge_state_dicts, merge_tensors

    __version__: str

#: public name -> the module that defines it
_HOMES = {
    "compress": "_compress",
    "decompress": "_compress",
    "extract_lora": "_extract_lora",
    "PlanReport": "_run",
    "RunReport": "_run",
    "plan": "_run",
    "run": "_run",
    "merge_adapters": "adapters",
    "CompatWarning": "errors",
    "ConfigError": "errors",
    "InputError": "errors",
    "MergeError": "errors",
    "OutputError": "errors",
    "ParameterError": "errors",
    "merge_state_dicts": "tensors",
    "merge_tensors": "tensors",
}

__all__ = [
    "CompatWarning",
    "ConfigError",
    "InputError",
    "MergeError",
    "OutputError",
    "ParameterError",
    "PlanReport",
    "RunReport",
    "__version__",
    "compress",
    "decompress",
    "extract_lora",
    "merge_adapters",
    "merge_state_dicts",
    "merge_tensors",
    "plan",
    "run",
]


def __getattr__(name: str) -> object:
    """A public name, imported on first use and then kept in the package's namespace; or a submodule (``import
    ferromerge`` used to import them all, so ``ferromerge.config.load_config`` keeps working)."""
    if name == "__version__":
        value: object = importlib.import_module("._engine", __name__).version()
    elif name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    else:
        try:
            return importlib.import_module(f".{name}", __name__)  # importing it sets the attribute too
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists and fails to import: that error, not "no attribute"
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
