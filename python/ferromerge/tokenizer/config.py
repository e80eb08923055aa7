"""The ``tokenizer:`` section of a merge config (mergekit's ``TokenizerConfig``): which vocabulary the output gets
and where added tokens' embedding rows come from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError
from ..models.refs import check_ref


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


def check_settings(settings: TokenizerSettings, where: str, refs: list[str]) -> None:
    """The checks pydantic cannot make, in config notation: the source (``where`` names its key) is union, base or a
    model reference; padding is positive; each token's row comes from one of the merged models ``refs`` (the rows
    are taken from the embeddings being merged), by exactly one of ``token`` and ``token_id``."""
    if settings.source not in ("union", "base"):
        check_ref(settings.source, where)
    if settings.pad_to_multiple_of is not None and settings.pad_to_multiple_of < 1:
        raise ConfigError(f"tokenizer.pad_to_multiple_of: must be a positive integer, got {settings.pad_to_multiple_of}")
    for token, entry in (settings.tokens or {}).items():
        place = f"tokenizer.tokens[{token!r}].source"
        if token == "":
            raise ConfigError("tokenizer.tokens: an empty token")
        src = entry.source
        model = src if isinstance(src, str) else src.model if isinstance(src, ModelTokenSource) else None
        if isinstance(src, ModelTokenSource):
            if (src.token is None) == (src.token_id is None):
                raise ConfigError(f"{place}: give exactly one of token and token_id")
            if src.token_id is not None and src.token_id < 0:
                raise ConfigError(f"{place}.token_id: must be >= 0, got {src.token_id}")
        if model is not None and check_ref(model, place) not in refs:
            raise ConfigError(
                f"{place}: {model!r} is not one of the merged models ({', '.join(dict.fromkeys(refs))}); the row "
                "is taken from the embeddings being merged"
            )
