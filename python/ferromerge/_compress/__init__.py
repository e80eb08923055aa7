"""Compress a family of fine-tunes of one base into task-vector archives, and rebuild them (docs/compress.md).

Private (``_compress``) because ``ferromerge.compress`` is the public function."""

from .pack import CompressReport, compress
from .unpack import DecompressReport, ModelSummary, decompress

__all__ = ["CompressReport", "DecompressReport", "ModelSummary", "compress", "decompress"]
