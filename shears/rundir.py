"""The run directory: every path of RUN's layout, named in one place.

RUN is the only thing the stages share (docs/DESIGN.md). Each stage writes its own part and reads
the parts of earlier stages, always through `RunDir`, so a newcomer finds every file of a run here
and nowhere else:

    RUN/recipe.yaml          the fully resolved recipe             (train_supernet)
    RUN/sparse_base/         pruned HF model folder + sparsity.json (train_supernet via sparsity)
    RUN/quantized_base/      the (pruned) base as Q8_0/Q4_0 blocks + quantization.json (train_supernet via quantize)
    RUN/channel_order.safetensors  importance order of elastic-width channels (train_supernet via width)
    RUN/checkpoints/         Trainer checkpoints, stage-<i>/ per In-Squeeze stage (train_supernet)
    RUN/supernet/            the trained super-network             (train_supernet via elastic)
    RUN/train_summary.json   validation losses and trained configs (train_supernet)
    RUN/warm_start.jsonl     the search's scores of the maximal/heuristic/minimal subnets (train_supernet)
    RUN/trace/rank<k>.jsonl  the configs each process trained      (train_supernet)
    RUN/latency.json         per-site latency table of the latency objective (search via width)
    RUN/search/              history.jsonl, front.json/.csv/.png, study.db (search)
    RUN/export/              one stock-PEFT folder per subnet, each with its model card README.md
                             [+ manifest.json, README.md of the front] (export)
    RUN/gguf/                base.gguf + one folder per subnet (adapter.gguf [+ merged.gguf]) for llama.cpp
                             (export --format gguf)

Which file inside a stage's folder holds what is for the folder's writer to say; the names of the
files that another stage reads (the search's front, an export's records) are here too. This module
imports nothing of shears, so every stage, however early, may use it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

# The provenance record shears writes into a folder it makes; its "format" field says which kind
# (shears-supernet/1 in RUN/supernet, shears-export/1 in an exported subnet folder).
SHEARS_RECORD = "shears.json"
README = "README.md"  # an export's front README, and each subnet folder's model card
SPARSE_BASE = "sparse_base"  # RUN/sparse_base; also named in the export README, which ships beside it
QUANTIZED_BASE = "quantized_base"  # RUN/quantized_base: the base training ran on when the recipe quantizes


@dataclass(frozen=True)
class SearchFiles:
    """A search's output folder (RUN/search, or any folder `search()` is given)."""

    folder: Path

    @property
    def history(self) -> Path:
        return self.folder / "history.jsonl"

    @property
    def front_json(self) -> Path:
        return self.folder / "front.json"

    @property
    def front_csv(self) -> Path:
        return self.folder / "front.csv"

    @property
    def front_png(self) -> Path:
        return self.folder / "front.png"

    @property
    def study_db(self) -> Path:
        return self.folder / "study.db"


@dataclass(frozen=True)
class ExportFiles:
    """An export's output folder (RUN/export, or any --output): one folder per subnet plus, for a
    front, its manifest and README."""

    folder: Path

    def subnet(self, name: str) -> Path:
        return self.folder / name

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.json"

    @property
    def readme(self) -> Path:
        return self.folder / README


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory. Creating one touches nothing on disk."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    # ---- training (and the pruning it runs first)

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def sparse_base(self) -> Path:
        return self.root / SPARSE_BASE

    @property
    def quantized_base(self) -> Path:
        return self.root / QUANTIZED_BASE

    @property
    def channel_order(self) -> Path:
        return self.root / "channel_order.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def stage_checkpoints(self, index: int, stages: int) -> Path:
        """Checkpoints of In-Squeeze stage `index` of `stages` (a one-stage run uses checkpoints/)."""
        return self.checkpoints if stages == 1 else self.checkpoints / f"stage-{index}"

    @property
    def supernet(self) -> Path:
        return self.root / "supernet"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def warm_start(self) -> Path:
        """History records (shears.scores) of the anchors, scored at the end of training as the search
        scores them; the search imports them."""
        return self.root / "warm_start.jsonl"

    @property
    def trace(self) -> Path:
        return self.root / "trace"

    def trace_file(self, rank: int) -> Path:
        return self.trace / f"rank{rank}.jsonl"

    # ---- later stages

    @property
    def latency(self) -> Path:
        return self.root / "latency.json"

    @property
    def search(self) -> SearchFiles:
        return SearchFiles(self.root / "search")

    @property
    def export(self) -> ExportFiles:
        return ExportFiles(self.root / "export")

    @property
    def gguf(self) -> ExportFiles:
        """The GGUF export for llama.cpp (its files are named by shears.gguf_export, which writes it whole)."""
        return ExportFiles(self.root / "gguf")

    # ---- what depends on what

    def has_base(self) -> bool:
        """Whether RUN holds a pruned base (else the recipe's model is the base)."""
        return (self.sparse_base / "config.json").is_file()

    def has_quantized_base(self) -> bool:
        """Whether RUN holds a quantized base (then training ran on it, whether or not it pruned first)."""
        return (self.quantized_base / "config.json").is_file()

    def has_supernet(self) -> bool:
        return (self.supernet / "adapter_config.json").is_file()

    def training_outputs(self) -> list[Path]:
        """What training writes (besides recipe.yaml and the reusable sparse_base and quantized_base) and everything that
        is derived from it: starting training over makes all of these stale."""
        return [self.supernet, self.channel_order, self.checkpoints, self.train_summary, self.warm_start,
                self.trace, self.search.folder, self.export.folder, self.gguf.folder]

    def holds_training(self) -> bool:
        return self.supernet.exists() or self.checkpoints.exists()

    def discard_training(self) -> None:
        """Remove the outputs of training and of every later stage (for --force: a fresh start)."""
        for path in self.training_outputs():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
