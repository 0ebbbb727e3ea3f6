"""The model card of one exported subnet: its README.md, with the YAML header the Hugging Face Hub and PEFT read.

`huggingface-cli upload ORG/NAME RUN/export/<subnet>` publishes the folder with a complete card:
`base_model` (the original model's id, never a path of this machine), `library_name` (peft for an adapter;
transformers for an elastic-width subnet, which is a smaller model in merged/), `tags`, and under `shears:`
the ranks and the scores the search measured with the number of validation records behind them.
`model-index` repeats the quality scores in the Hub's evaluation-results format. The run is named by its
folder's name, relatively.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import yaml

from .search.objectives import QUALITY


@dataclass
class CardContext:
    """What a card says about the run every subnet of an export comes from."""
    run_name: str  # the run folder's name, not its path
    task: str  # the evaluation task the search scored with (math, choice, loss)
    datasets: list[str] = field(default_factory=list)  # the training sources, by name


def rank_counts(ranks: dict[str, int]) -> dict[int, int]:
    """{rank: how many modules have it}, largest rank first."""
    counts = Counter(ranks.values())
    return {int(r): counts[r] for r in sorted(counts, reverse=True)}


def rank_summary(ranks: dict[str, int]) -> str:
    """"8x12 4x6": how many modules have each rank, largest rank first."""
    return " ".join(f"{r}x{n}" for r, n in rank_counts(ranks).items())


def base_description(base: dict) -> str:
    """The base in words: its id, and how it was pruned (the adapter expects that pruned base)."""
    sparsity = base.get("sparsity")
    if not sparsity:
        return f"`{base['model_id']}`"
    how = ", ".join(str(sparsity[k]) for k in ("method", "pattern") if sparsity.get(k))
    return (f"`{base['model_id']}` pruned to {sparsity.get('total', sparsity.get('sparsity', 0)):.0%} zeros"
            + (f" ({how})" if how else "") + ": the run's `sparse_base/`, not the original weights")


def metadata(record: dict, context: CardContext, records: int | None) -> dict:
    """The YAML header: what the Hub indexes (base_model, library_name, tags, model-index) and `shears:`."""
    width = record["adapter"] is None  # an elastic-width subnet: merged/ is the model, no adapter
    base = record["base_model"]
    objectives = record.get("objectives") or {}
    quality = {k: float(v) for k, v in objectives.items() if k in QUALITY}
    tags = ["shears", "lora", "nls"] + (["sparse", "pruned"] if base.get("pruned") else []) \
        + (["lora-squeeze"] if record.get("squeeze") else []) + (["elastic-width"] if width else [])
    card = {
        "base_model": base["model_id"],
        "library_name": "transformers" if width else "peft",
        "tags": tags,
        "shears": {
            "subnet": record["name"], "run": context.run_name,
            "ranks": rank_counts(record["module_ranks"]), "max_rank": record["max_rank"], "r_max": record["r_max"],
            "lora_alpha": record["lora_alpha"], "uniform_rank": record.get("uniform_rank"),
            "adapter_params": record["exported_adapter_params"],
            "scores": {k: float(v) for k, v in objectives.items()}, "records": records, "task": context.task,
        },
    }
    if quality:
        card["model-index"] = [{"name": record["name"], "results": [{
            "task": {"type": "text-generation"},
            "dataset": {"name": f"validation split of {', '.join(context.datasets) or 'the training data'}",
                        "type": context.datasets[0] if context.datasets else "custom", "split": "validation"},
            "metrics": [{"type": name, "value": value, "name": f"validation {name} ({records} records)"}
                        for name, value in quality.items()]}]}]
    return card


def subnet_card(record: dict, context: CardContext, records: int | None) -> str:
    """README.md of one exported subnet folder from its shears.json `record`; `records`: how many validation
    records its scores were measured on (None: not scored by a search)."""
    width = record["adapter"] is None
    header = yaml.safe_dump(metadata(record, context, records), sort_keys=False, allow_unicode=True)
    ranks = rank_summary(record["module_ranks"])
    base = record["base_model"]
    scores = record.get("objectives") or {}
    lines = ["---", header.rstrip(), "---", "",
             f"# {record['name']}: a subnet of the shears run `{context.run_name}`", "",
             f"Base: {base_description(base)}.", ""]
    if width:
        lines += ["This folder's `merged/` is a physically smaller model (the subnet's LoRA merged, every MLP cut "
                  "to its width); load it as a model, not as an adapter.", ""]
    else:
        lines += [f"A stock PEFT LoRA adapter with per-module ranks (rank x modules: {ranks}; "
                  f"{record['exported_adapter_params']:,} parameters).", "",
                  "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base['model_id']!r})"
                  + ("  # use the run's sparse_base/ here" if base.get("pruned") else ""),
                  "model = PeftModel.from_pretrained(base, \"PATH/TO/THIS/FOLDER\")", "```", ""]
    if scores:
        measured = ", ".join(f"{k} {v:.6g}" for k, v in scores.items())
        lines += [f"Measured by the search: {measured}"
                  + (f", on {records} validation records (task `{context.task}`)." if records else "."), ""]
    else:
        lines += ["Not scored by a search: `shears.evaluate` measures it.", ""]
    return "\n".join(lines)


__all__ = ["CardContext", "metadata", "rank_counts", "rank_summary", "subnet_card"]
