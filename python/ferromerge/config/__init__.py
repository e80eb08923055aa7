"""A mergekit YAML merge config, read and validated into a ``MergeConfig``: the YAML's schema (``schema``),
parameter settings (``settings``) and their resolution into the merge's slices and levels (``resolve``)."""

from .resolve import MergeConfig, load_config, parse_config

__all__ = ["MergeConfig", "load_config", "parse_config"]
