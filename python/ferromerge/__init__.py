"""ferromerge: Rust-accelerated, streaming merges of LLM weights with mergekit's methods and YAML configs.

``run`` merges the models of a mergekit YAML config into an output directory, and ``plan`` checks such a config
and predicts the run's disk, memory and time without writing anything; ``merge_tensors`` and
``merge_state_dicts`` merge in memory; ``extract_lora`` factors a fine-tune's difference from its base into a
LoRA adapter; ``merge_adapters`` merges LoRA adapters into one adapter; ``compress`` and ``decompress`` store a
family of fine-tunes as task-vector archives.
"""

from . import _engine
from ._compress import compress, decompress
from ._extract_lora import extract_lora
from ._run import PlanReport, RunReport, plan, run
from .adapters import merge_adapters
from .errors import CompatWarning, ConfigError, InputError, MergeError, OutputError, ParameterError
from .tensors import merge_state_dicts, merge_tensors

__version__ = _engine.version()

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
