"""ferromerge: Rust-accelerated, streaming merges of LLM weights (TIES, DARE, task arithmetic, linear).

``run`` merges the models of a mergekit YAML config into an output directory; ``merge_tensors`` and
``merge_state_dicts`` merge in memory.
"""

from ._core import InputError, MergeError, OutputError, ParameterError, __version__
from ._compress import compress, decompress
from .errors import ConfigError
from ._extract_lora import extract_lora
from ._run import RunReport, run
from .tensors import merge_state_dicts, merge_tensors

__all__ = [
    "ConfigError",
    "InputError",
    "MergeError",
    "OutputError",
    "ParameterError",
    "RunReport",
    "__version__",
    "compress",
    "decompress",
    "extract_lora",
    "merge_state_dicts",
    "merge_tensors",
    "run",
]
