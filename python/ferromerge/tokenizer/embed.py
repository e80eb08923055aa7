"""Each model's embedding and lm_head rows laid out in the merged vocabulary (``vocab.Vocabulary``), written
to temporary safetensors files that the merge then reads in place of the models' own tensors.

The rows of output token t for a model (mergekit 0.1.5's ``PermutedVocabulary``):

* the model's own row of the token, unless it lacks the token or a ``tokens:`` entry forces another source;
* otherwise the token's default row, in this order of precedence: the ``tokens:`` entry (a model's row of the
  token, a model's row of another token or id, or zero); the row of the only model that has the token; the base
  model's row; the mean of the rows of the models that have it; zero when no model has it.
* rows beyond the vocabulary (``pad_to_multiple_of``) are the mean of the model's rows of the vocabulary.

Streaming: the sources are memory-mapped and every model's file is written in blocks of output rows, so the
memory used is a few blocks whatever the vocabulary, never a whole embedding matrix. Values are read exactly,
rounded to the config's ``dtype`` first when it has one (mergekit casts before permuting), averaged in float32 in
model order and rounded once to the file's dtype (the config's ``dtype``, else the models' common dtype, float32
when they differ).

The module reads top-down: planning which source row fills each output row (``fill_plan``), then writing the
permuted tensors block by block (``write_permuted``); the two share the plan's types and nothing else uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, InputError, OutputError
from ..io.dtypes import (
    ITEMSIZE,
    MERGEABLE_DTYPES,
    RAW,
    ST_NAME,
    from_f32,
    round_to,
    to_f32,
)
from ..io.reader import read_header
from ..io.writer import header_bytes
from ..models.index import TensorInfo
from .config import ModelTokenSource, TokenEmbedding, ZeroSource
from .vocab import Vocabulary

#: bytes of float32 rows handled at once per model (bounds the writer's memory)
BLOCK_BYTES = 8 << 20

# default-row kinds
_OWN, _COPY, _ZERO, _MEAN = 0, 1, 2, 3


@dataclass(frozen=True)
class Member:
    """One model's source tensor of an output vocabulary tensor, and where its permuted copy goes."""

    ref: str
    info: TensorInfo
    tensor: str
    #: old row of every output token (-1: absent)
    perm: npt.NDArray[np.int64]
    out: Path


@dataclass(frozen=True)
class PermutedTensor:
    """One output vocabulary tensor: what to write for each of its models before the merge runs."""

    name: str
    members: tuple[Member, ...]
    #: rows of the output (the vocabulary, padded)
    rows: int
    #: safetensors dtype name of the written files
    dtype: str
    #: per output token: _OWN (no default row needed), _COPY, _ZERO or _MEAN
    kind: npt.NDArray[np.int8]
    #: per token: the row comes from the default even where the model has the token (``force: true``)
    forced: npt.NDArray[np.bool_]
    #: for _COPY: the member index and its row
    src_member: npt.NDArray[np.int64]
    src_row: npt.NDArray[np.int64]
    #: mergekit's dtype: sources are rounded to it before anything else
    cast_dtype: str | None
    #: tokens no model has (their rows are zero), for a warning
    orphans: tuple[str, ...]

    @property
    def width(self) -> int:
        return int(np.prod(self.members[0].info.shape[1:], dtype=np.int64))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.members[0].info.shape[1:])

    @property
    def bytes_out(self) -> int:
        return len(self.members) * self.rows * self.width * ITEMSIZE[self.dtype]


class Aligner:
    """Collects the vocabulary tensors of a plan: ``permute`` returns the temporary files that replace a tensor's
    sources, ``tensors`` what ``write_permuted`` must write into ``scratch`` before the merge."""

    def __init__(self, vocabulary: Vocabulary, scratch: Path, cast_dtype: str | None) -> None:
        self.vocabulary = vocabulary
        self.scratch = scratch
        self.cast_dtype = cast_dtype
        self.tensors: list[PermutedTensor] = []

    def permute(
        self, name: str, sources: Sequence[tuple[str, TensorInfo, str]], base: str | None
    ) -> list[TensorInfo]:
        """``sources``: (model reference, tensor info, tensor name) of every model feeding output tensor ``name``;
        ``base`` the base model (its row wins for tokens several models have). Returns the files to read instead,
        in the same order, each holding the permuted tensor under ``name``."""
        first_ref, first, first_name = sources[0]
        for ref, info, tensor in sources:
            if len(info.shape) < 1 or info.shape[1:] != first.shape[1:]:
                raise InputError(
                    f"{info.file}: tensor {tensor} of model {ref!r} has shape {list(info.shape)} but {first.file} "
                    f"has {list(first.shape)} ({first_name} of {first_ref!r}); vocabulary alignment needs the same "
                    "shape apart from the number of rows"
                )
        vocab = self.vocabulary
        refs = [ref for ref, _, _ in sources]
        perms = np.stack([vocab.permutations[ref] for ref in refs])
        dtypes = {MERGEABLE_DTYPES[info.dtype] for _, info, _ in sources}
        dtype = self.cast_dtype or (dtypes.pop() if len(dtypes) == 1 else "float32")
        k = len(self.tensors)
        members = tuple(
            Member(ref, info, tensor, perms[i], self.scratch / f"vocab-{k:04d}-{i:03d}.safetensors")
            for i, (ref, info, tensor) in enumerate(sources)
        )
        kind, forced, src_member, src_row, orphans = fill_plan(
            perms, refs, base, list(vocab.vocab), vocab.settings.tokens or {}, vocab.original, name
        )
        job = PermutedTensor(
            name, members, vocab.rows, ST_NAME[dtype], kind, forced, src_member, src_row, self.cast_dtype, orphans
        )
        for m in members:
            _check_rows(m, m.perm, "the tokenizer gives it")
        for i, m in enumerate(members):
            _check_rows(m, src_row[(kind == _COPY) & (src_member == i)], "a tokens: entry takes")
        self.tensors.append(job)
        return [TensorInfo(m.out, job.dtype, job.shape) for m in members]


def _check_rows(m: Member, rows: npt.NDArray[np.int64], why: str) -> None:
    if rows.size and int(rows.max()) >= m.info.shape[0]:
        raise InputError(
            f"{m.info.file}: tensor {m.tensor} of model {m.ref!r} has {m.info.shape[0]} rows, but {why} row "
            f"{int(rows.max())}; its config.json vocab_size or tokenizer does not match its weights"
        )


def fill_plan(
    perms: npt.NDArray[np.int64],
    refs: Sequence[str],
    base: str | None,
    tokens: Sequence[str],
    overrides: Mapping[str, TokenEmbedding],
    original: Mapping[str, Mapping[str, int]],
    name: str,
) -> tuple[
    npt.NDArray[np.int8], npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.int64], tuple[str, ...]
]:
    """Where each output token's default row comes from (see the module doc): per token its kind, whether it is
    forced, and for copies the member index and row. ``ConfigError`` for a ``tokens:`` entry that cannot be
    served (the model is not among ``refs`` or lacks the token)."""
    m, n = perms.shape
    present = perms >= 0
    count = present.sum(axis=0)
    forced = np.zeros(n, dtype=bool)
    index = {t: i for i, t in enumerate(tokens)}
    for token, entry in overrides.items():
        if entry.force and token in index:
            forced[index[token]] = True
    need = forced | (count < m)
    kind = np.full(n, _OWN, dtype=np.int8)
    src_member = np.full(n, -1, dtype=np.int64)
    src_row = np.full(n, -1, dtype=np.int64)

    single = need & (count == 1)
    kind[single] = _COPY
    src_member[single] = np.argmax(present[:, single], axis=0)
    src_row[single] = perms[src_member[single], np.flatnonzero(single)]
    kind[need & (count == 0)] = _ZERO
    rest = need & (count > 1)
    if base is not None and base in refs:
        b = list(refs).index(base)
        from_base = rest & present[b]
        kind[from_base] = _COPY
        src_member[from_base] = b
        src_row[from_base] = perms[b, from_base]
        rest &= ~present[b]
    kind[rest] = _MEAN

    for token, entry in overrides.items():
        t = index.get(token)
        if t is None or not need[t]:
            continue
        where = f"tokenizer.tokens[{token!r}].source"
        src = entry.source
        if isinstance(src, ZeroSource):
            kind[t] = _ZERO
            continue
        model = src.model if isinstance(src, ModelTokenSource) else src
        if model not in refs:
            raise ConfigError(
                f"{where}: token {token!r} takes its {name} row from model {model!r}, which does not feed {name} "
                f"(its models: {', '.join(refs)})"
            )
        k = list(refs).index(model)
        if isinstance(src, ModelTokenSource):
            if src.token_id is not None:
                row = src.token_id
            else:
                row = original[model].get(src.token or "", -1)
                if row < 0:
                    raise ConfigError(f"{where}: token {src.token!r} is not in the tokenizer of {model!r}")
        else:
            row = int(perms[k, t])
            if row < 0:
                raise ConfigError(f"{where}: model {model!r} has no token {token!r} to take its row from")
        kind[t], src_member[t], src_row[t] = _COPY, k, row
    orphans = tuple(tokens[t] for t in np.flatnonzero((kind == _ZERO) & (count == 0)) if tokens[t] not in overrides)
    return kind, forced, src_member, src_row, orphans


class _Source:
    """A memory-mapped tensor of a safetensors file, viewed as [rows, width], decoded to float32 on read."""

    def __init__(self, m: Member, width: int) -> None:
        path = m.info.file
        try:
            _, _, start, end = read_header(path).tensors[m.tensor]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: cannot read tensor {m.tensor}: {e}") from None
        rows = m.info.shape[0]
        if end - start != rows * width * ITEMSIZE[m.info.dtype]:
            raise InputError(f"{path}: tensor {m.tensor}: {end - start} bytes of data for shape {list(m.info.shape)}")
        self.dtype = m.info.dtype
        self.data = np.memmap(path, dtype=RAW[m.info.dtype], mode="r", offset=start, shape=(rows, width))

    def rows(self, index: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return to_f32(np.asarray(self.data[index]), self.dtype)


def write_permuted(
    tensors: Sequence[PermutedTensor], log: Callable[[str], None] = lambda _: None, block_bytes: int = BLOCK_BYTES
) -> int:
    """Write every model's permuted copy of every tensor; returns the bytes written."""
    total = 0
    for job in tensors:
        if job.orphans:
            shown = ", ".join(repr(t) for t in job.orphans[:5]) + (" ..." if len(job.orphans) > 5 else "")
            log(f"note: {len(job.orphans)} token(s) of the output vocabulary are in no model, {job.name} rows zero: {shown}")
        total += _write_one(job, block_bytes)
    return total


def _write_one(job: PermutedTensor, block_bytes: int) -> int:
    width = job.width
    n = len(job.kind)
    sources = [_Source(m, width) for m in job.members]
    cast = ST_NAME[job.cast_dtype] if job.cast_dtype else None
    nbytes = job.rows * width * ITEMSIZE[job.dtype]
    sums = np.zeros((len(job.members), width), dtype=np.float64)
    step = max(1, block_bytes // max(1, 4 * width))
    files = []
    try:
        for m in job.members:
            f = open(m.out, "wb")  # noqa: SIM115 (closed below, all together)
            files.append(f)
            f.write(header_bytes([(job.name, job.dtype, job.shape, 0, nbytes)], {"format": "pt"}))

        def read(i: int, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            x = sources[i].rows(rows)
            return round_to(x, cast) if cast else x

        for a in range(0, n, step):
            b = min(n, a + step)
            default = _defaults(job, a, b, width, read)
            for i, m in enumerate(job.members):
                own = (m.perm[a:b] >= 0) & ~job.forced[a:b]
                block = default.copy()
                block[own] = read(i, m.perm[a:b][own])
                out = from_f32(block, job.dtype)
                sums[i] += to_f32(out, job.dtype).sum(axis=0, dtype=np.float64)
                files[i].write(out.tobytes())
        if job.rows > n:
            for i, f in enumerate(files):
                mean = (sums[i] / n).astype(np.float32) if n else np.zeros(width, np.float32)
                row = from_f32(mean[None, :], job.dtype).tobytes()
                f.write(row * (job.rows - n))
    except OSError as e:
        raise OutputError(f"cannot write the permuted {job.name} to {job.members[0].out.parent}: {e}") from None
    finally:
        for f in files:
            f.close()
    return nbytes * len(job.members)


def _defaults(
    job: PermutedTensor,
    a: int,
    b: int,
    width: int,
    read: Callable[[int, npt.NDArray[np.int64]], npt.NDArray[np.float32]],
) -> npt.NDArray[np.float32]:
    """The default rows of tokens [a, b) (zero where none is needed)."""
    out = np.zeros((b - a, width), dtype=np.float32)
    kind = job.kind[a:b]
    copy = kind == _COPY
    for i in np.unique(job.src_member[a:b][copy]):
        sel = copy & (job.src_member[a:b] == i)
        out[sel] = read(int(i), job.src_row[a:b][sel])
    mean = kind == _MEAN
    if mean.any():
        count = np.zeros(b - a, dtype=np.float32)
        for i, m in enumerate(job.members):
            sel = mean & (m.perm[a:b] >= 0)
            out[sel] += read(i, m.perm[a:b][sel])  # float32, model order: mergekit's running sum
            count[sel] += 1
        out[mean] /= count[mean][:, None]
    return out
