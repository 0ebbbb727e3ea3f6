"""What a subnet is scored on: one quality objective measured by running the model, and size
objectives computed analytically from the config (never by a model run).

    accuracy        validation accuracy (maximise)         -> normalised 1 - accuracy
    loss            validation loss (minimise)             -> normalised 1 - exp(-loss)
    adapter_params  LoRA parameters of the subnet          -> normalised (s - s_min) / (s_max - s_min)
    nonzero_params  non-zeros of the deployed model        -> normalised the same way
    params          parameters of the deployed model (LoRA merged, elastic widths cut) -> the same
    latency         seconds per forward of the deployed model on this device, predicted from a per-site
                    latency table measured once and cached in RUN/latency.json -> the same

Normalised values are minimised and lie in [0, 1] (s_min/s_max are the minimal and maximal subnets'
sizes, known before any evaluation; exp(-loss) is the geometric-mean probability of the target
tokens), so one reference point, 1.1 in every objective, serves every hypervolume of every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from peft import get_peft_model_state_dict

from ..errors import ShearsError
from ..scores import Scoring
from ..search_space import Config
from ..noise import PerRecord
from ..squeeze import PEFT_PREFIX


QUALITY = {"accuracy": True, "loss": False}  # name -> maximise?
SIZES = ("adapter_params", "nonzero_params", "params", "latency")
REFERENCE = 1.1  # hypervolume reference point, in every normalised objective


@dataclass(frozen=True)
class Objective:
    name: str
    maximize: bool
    low: float = 0.0  # size objectives: the minimal subnet's size ...
    high: float = 1.0  # ... and the maximal subnet's

    @property
    def is_size(self) -> bool:
        return self.name in SIZES

    def normalised(self, value: float) -> float:
        """The value as a minimised number in [0, 1] (see the module docstring)."""
        if self.name == "accuracy":
            return 1.0 - value
        if self.name == "loss":
            return 1.0 - math.exp(-value)
        span = self.high - self.low
        return (value - self.low) / span if span > 0 else 0.0

    def minimised(self, value: float) -> float:
        """The raw value, sign-flipped when maximised: dominance is checked on these."""
        return -value if self.maximize else value


# Why a size objective can be the same for every subnet, and what to search on instead.
_RANKS_MERGE = "ranks merge away; give the space width groups, e.g. search_spaces/llama-width.yaml"
CONSTANT_HINT = {"nonzero_params": "a masked (sparse_adapter) update merges into the base's sparsity pattern, "
                                   "so the deployed model has the base's non-zeros whatever the ranks",
                 "params": _RANKS_MERGE, "latency": _RANKS_MERGE}


def check_objective_names(names: str | list[str]) -> list[str]:
    """The names of "accuracy,adapter_params"-style objectives, or a ShearsError naming the fix."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    known = [*QUALITY, *SIZES]
    for name in names:
        if name not in known:
            raise ShearsError(f"unknown objective {name!r}: choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ShearsError(f"objectives {names} name one twice: list each once")
    if not any(n in QUALITY for n in names) or not any(n in SIZES for n in names):
        raise ShearsError(f"objectives {names} need one quality (accuracy or loss) and one size "
                          f"({', '.join(SIZES)}), e.g. --objectives accuracy,adapter_params")
    return names


def parse_objectives(names: str | list[str], size_of: Callable[[str, Config], float],
                     minimal: Config, maximal: Config) -> tuple[Objective, ...]:
    """Objectives from names like "accuracy,adapter_params"; sizes get their [min, max] range.

    Every size here grows with each rank, so a size equal at the minimal and maximal subnets is equal
    for every subnet: a search on it would have no size axis, and is refused."""
    out = []
    for name in check_objective_names(names):
        if name in QUALITY:
            out.append(Objective(name, QUALITY[name]))
            continue
        low, high = float(size_of(name, minimal)), float(size_of(name, maximal))
        if low == high:
            why = f" ({CONSTANT_HINT[name]})" if name in CONSTANT_HINT else ""
            others = [s for s in SIZES if s != name]
            raise ShearsError(f"size objective {name} is {low:,.0f} for every subnet of this space{why}: search on "
                              f"{' or '.join(others)} instead")
        out.append(Objective(name, False, low, high))
    return tuple(out)


# ----------------------------------------------------------------------------- from a super-network


def nonzero_counter(supernet) -> Callable[[Config], float]:
    """Non-zeros of the model a user deploys with a config's subnet.

    A dense adapter is deployed beside the sparse base, unmerged (merging B @ A would fill the pruned
    entries): the base's non-zeros plus those of the subnet's sliced A[:r] and B[:, :r], which grow with r.
    A masked adapter (sparse_adapter) merges into the base's sparsity pattern, so the deployed (merged)
    model has the base's non-zeros -- the same for every config, which parse_objectives refuses."""
    base = supernet.model.get_base_model()
    base_nonzeros = sum(int(p.count_nonzero()) for n, p in base.named_parameters() if "lora_" not in n)
    if supernet.sparse_adapter:
        return lambda config: float(base_nonzeros)
    # module -> non-zeros of its adapter at every rank 0..r_max: cumulated rows of A plus columns of B
    by_rank: dict[str, list[int]] = {}
    for key, tensor in get_peft_model_state_dict(supernet.model).items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        per_rank = (tensor != 0).sum(dim=1 if kind == "A.weight" else 0)  # A: r x in; B: out x r
        counts = by_rank.setdefault(module, [0] * (len(per_rank) + 1))
        for r, total in enumerate(per_rank.cumsum(0).tolist(), start=1):
            counts[r] += int(total)

    def count(config: Config) -> float:
        ranks = supernet.space.module_ranks(config)
        return float(base_nonzeros + sum(by_rank[m][r] for m, r in ranks.items()))

    return count


def supernet_objective(supernet, tokenizer, scoring: Scoring, objectives: tuple[Objective, ...],
                       sizes: dict[str, Callable[[Config], float]]) -> Callable[[Config], dict[str, float]]:
    """config -> every objective's value: quality by `scoring` (shears.scores: the run's evaluation
    records, settings and precision), sizes analytically."""

    def run(task_name: str, n_examples: int | None) -> dict:
        return scoring.evaluate(supernet, tokenizer, task_name, n_examples)

    quality = [o.name for o in objectives if not o.is_size]

    def measure(config: Config, n_examples: int | None = None) -> dict[str, float]:
        """Every objective of `config`, quality scored on the first `n_examples` records (or all)."""
        supernet.activate(config)
        values: dict[str, Any] = {}
        per_task: dict[str, dict] = {}  # quality objective -> the evaluation result that measured it
        if "accuracy" in quality:
            values.update(run(scoring.task, n_examples))
            per_task["accuracy"] = values
        if "loss" in quality and values.get("loss") is None:
            values = {**values, **run("loss", n_examples)}
            per_task["loss"] = values
        for name in quality:
            if values.get(name) is None:
                raise ShearsError(f"evaluation task {scoring.task!r} gives no {name}: use --objectives loss,... or a "
                                  "recipe whose evaluation.task is math or choice")
        out: dict[str, Any] = {name: float(values[name]) for name in quality}
        out.update({o.name: sizes[o.name](config) for o in objectives if o.is_size})
        # each quality's per-record values: the noise behind the score (shears/noise.py)
        out["per_record"] = {name: PerRecord.from_result(per_task[name]) for name in quality
                             if per_task.get(name, {}).get("per_record")}
        return out

    return measure


def latency_function(run) -> Callable[[Config], float]:
    """config -> predicted forward seconds of its exported model (recipe search.latency_batch_size x
    search.latency_seq_len tokens), from RUN/latency.json (measured on first use)."""
    from ..models import load_model
    from ..width import cached_latency_table

    space, s = run.supernet.space, run.recipe.search
    table = cached_latency_table(run.dir.latency, lambda: load_model(run.base_source, dtype=run.recipe.dtype),
                                 space, s.latency_batch_size, s.latency_seq_len)
    return lambda config: table.latency(space, config)


def size_function(supernet, name: str, run=None) -> Callable[[Config], float]:
    if name == "adapter_params":
        return lambda config: float(supernet.space.adapter_params(config))
    if name == "nonzero_params":
        return nonzero_counter(supernet)
    if name == "params":
        from ..width import deployed_params

        return deployed_params(supernet.model, supernet.space)
    if name == "latency":
        if run is None:
            raise ShearsError("the latency objective measures the run's base model: search a run directory")
        return latency_function(run)
    raise ShearsError(f"unknown size objective {name!r}: choose from {', '.join(SIZES)}")
