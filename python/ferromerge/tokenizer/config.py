"""The ``tokenizer:`` section of a merge config (mergekit's ``TokenizerConfig``): which vocabulary the output gets
and where added tokens' embedding rows come from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ModelTokenSource(BaseModel):
    """``tokenizer.tokens.<tok>.source: {kind: model_token, model, token | token_id}``: a row of one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None


class ZeroSource(BaseModel):
    """``tokenizer.tokens.<tok>.source: {kind: zero}``: a zero row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """``tokenizer.tokens.<tok>``: where the token's embedding rows come from; ``force`` also replaces the rows
    of models that have the token. ``source`` is a model reference (that model's row of the token), a
    ``model_token`` or ``zero``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: ModelTokenSource | ZeroSource | str
    force: bool = False


class TokenizerSettings(BaseModel):
    """``tokenizer:`` (mergekit's ``TokenizerConfig``); ``tokenizer_source: X`` is ``tokenizer: {source: X}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: "union", "base" or a model reference
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None
