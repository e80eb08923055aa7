"""Model cards: the ``README.md`` of an output, whose YAML front matter the Hugging Face Hub reads (``base_model``,
``tags``, ``library_name``) and whose text says how the output was made.

A merge's card has the front matter mergekit 0.1.5 writes (``base_model``: the Hub models merged, ``library_name:
transformers``, ``tags`` ``mergekit`` and ``merge``, which the Hub's merge listings filter on, plus ``ferromerge``), then
the method with a link to its paper (``PAPERS``), the models and the config as given. An extracted LoRA's card is a
PEFT adapter card (``library_name: peft``, ``base_model``: the base). Texts are ferromerge's own.

A reference is a Hub model when it is not a local path (mergekit's rule without its network query: ferromerge
resolved every reference already, so a reference that is not a local directory came from the Hugging Face cache).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from . import _engine
from .config.resolve import MergeConfig
from .errors import OutputError
from .models.refs import split_ref

__all__ = ["PAPERS", "front_matter", "hub_id", "lora_card", "merge_card", "method_markdown", "write_card"]

CARD = "README.md"

#: every method's display name and the paper (or page) that defines it; None where there is none to cite.
#: ``tests/cli/test_model_card.py`` checks that every method of the registry has a row.
PAPERS: dict[str, tuple[str, str | None]] = {
    "linear": ("Linear (model soups)", "https://arxiv.org/abs/2203.05482"),
    "passthrough": ("Passthrough", None),
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE with TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("DARE, linear", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("DELLA, linear", "https://arxiv.org/abs/2406.11617"),
    "slerp": ("SLERP", "https://en.wikipedia.org/wiki/Slerp"),
    "nuslerp": ("NuSLERP", None),
    "multislerp": ("Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "karcher": ("Karcher mean", "https://arxiv.org/abs/2603.04972"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "sce": ("SCE", "https://arxiv.org/abs/2408.07990"),
    "ram": ("RAM (Reinforced Agent Merging)", "https://arxiv.org/abs/2601.13572"),
    "ramplus_tl": ("RAM+ (tensor-local)", "https://arxiv.org/abs/2601.13572"),
    "nearswap": ("NearSwap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    "arcee_fusion": ("Arcee Fusion", "https://arcee.ai"),
    "tsv_m": ("TSV-M (Task Singular Vectors)", "https://arxiv.org/abs/2412.00081"),
    "iso_c": ("Iso-C (isotropic merging)", "https://arxiv.org/abs/2502.04959"),
    "iso_cts": ("Iso-CTS (isotropic merging, common and task-specific subspaces)", "https://arxiv.org/abs/2502.04959"),
    "star": ("STAR (Spectral Truncation and Rescale)", "https://arxiv.org/abs/2502.10339"),
    "consensus": ("Consensus merging (TALL masks)", "https://arxiv.org/abs/2405.07813"),
    "tall_masks": ("TALL masks", "https://arxiv.org/abs/2405.07813"),
}

#: the tags mergekit puts on a merge (the Hub's merge listings filter on them), and ferromerge's own
MERGE_TAGS = ("mergekit", "merge", "ferromerge")
LORA_TAGS = ("peft", "lora", "ferromerge")


def hub_id(ref: str) -> str | None:
    """The Hub repository id of a model reference (``org/name`` without ``@revision``), None for a local path."""
    path = ref.partition("@")[0]
    if not path or path[0] in "/~." or path.count("/") != 1 or os.path.exists(path):
        return None
    return path


def _parts(ref: str) -> list[str]:
    """A reference's models: the model and, for ``model+lora``, the adapter."""
    split = split_ref(ref, "model reference")
    return [ref] if split is None else list(split)


def _hub_ids(refs: Iterable[str]) -> list[str]:
    ids: list[str] = []
    for ref in refs:
        for part in _parts(ref):
            found = hub_id(part)
            if found is not None and found not in ids:
                ids.append(found)
    return ids


def _front_matter(data: Mapping[str, Any]) -> str:
    # sorted keys, as mergekit's yaml.dump writes them
    return "---\n" + yaml.safe_dump(dict(data), sort_keys=True) + "---\n"


def _model_markdown(ref: str) -> str:
    """A reference as Markdown: Hub models linked to their page, ``model+lora`` as both."""
    out = []
    for part in _parts(ref):
        found = hub_id(part)
        out.append(f"[{part}](https://huggingface.co/{found})" if found is not None else f"`{part}`")
    return " + ".join(out)


def method_markdown(method: str) -> str:
    """The method's display name, linked to its paper when it has one."""
    name, url = PAPERS.get(method, (method, None))
    return f"[{name}]({url})" if url else name


def _fenced(text: str, lang: str) -> str:
    """``text`` in a code fence longer than any backtick run inside it."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def merge_card(config: MergeConfig, name: str, *, seed: int | None = None) -> str:
    """The card of a merge output called ``name``: front matter, method and paper, models, the config as given."""
    refs = config.model_refs()
    base = config.base
    lines = [
        _front_matter({"base_model": _hub_ids(refs), "library_name": "transformers", "tags": list(MERGE_TAGS)}),
        f"# {name}",
        "",
        f"This model merges pre-trained language models. It was made with ferromerge {_engine.version()} from the "
        "[mergekit](https://github.com/arcee-ai/mergekit) configuration below.",
        "",
        "## Merge method",
        "",
        f"{method_markdown(config.method.name)}"
        + (f", over the base model {_model_markdown(base)}." if base is not None else "."),
    ]
    if seed is not None and config.method.random:
        lines += ["", f"Its random choices come from seed {seed} (`ferromerge run --seed {seed}` repeats them)."]
    lines += ["", "## Models", "", *(f"- {_model_markdown(r)}" for r in refs if r != base)]
    lines += ["", "## Configuration", "", _fenced(config.text, "yaml"), ""]
    return "\n".join(lines)


def lora_card(
    base: str, finetuned: str, name: str, summary: Mapping[str, Any], params: Mapping[str, Any]
) -> str:
    """The PEFT adapter card of an extracted LoRA called ``name`` (``summary``: what ``extract_lora`` returns)."""
    saved = ", ".join(summary["modules_to_save"]) or "none"
    lines = [
        _front_matter({"base_model": _hub_ids([base]), "library_name": "peft", "tags": list(LORA_TAGS)}),
        f"# {name}",
        "",
        f"A LoRA adapter extracted by ferromerge {_engine.version()} from the difference between "
        f"{_model_markdown(finetuned)} (fine-tuned) and {_model_markdown(base)} (base).",
        "",
        f"- rank r = {summary['r']} over {len(summary['ranks'])} modules ({', '.join(summary['target_modules'])}); "
        f"modules saved at full rank: {saved}",
        f"- relative reconstruction error ‖ΔW − B·A‖_F / ‖ΔW‖_F: max {summary['max_error']:.3g}, "
        f"mean {summary['mean_error']:.3g}",
        f"- parameters: {', '.join(f'{k}={v!r}' for k, v in params.items())}",
        "",
        "Load it with PEFT: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)`.",
        "",
    ]
    lines += [f"Note: {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def write_card(out: Path, text: str) -> None:
    """Write ``text`` as ``out/README.md``."""
    try:
        (out / CARD).write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {out / CARD}: {e}") from None


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (``{}`` when it has none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    data = yaml.safe_load(text[4:end]) if end >= 0 else None
    return data if isinstance(data, dict) else {}
