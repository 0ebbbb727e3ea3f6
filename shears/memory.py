"""What each stage of a run needs in memory, from the recipe and the model's config.json alone.

    python -m shears.train_supernet --recipe recipes/llama-7b-math-shears.yaml --plan [--device-memory 24GiB]

No weights are read: the model is built on the meta device (transformers' `from_config` under
`torch.device("meta")`) to count its parameters, and the recipe's search space is bound to it for the
adapter's. Each stage's need is the sum of the terms below (bytes; w = bytes per weight in the recipe's
dtype, a = the same for activations, which live in the weights' dtype; B x S = batch x tokens):

    prune     weights + Wanda's captured hidden states (nsamples x seqlen x hidden x a) + one block's
              forward on one calibration batch + the scores of SCORE_CHUNK entries of one matrix (SparseGPT:
              one block's input Hessians instead) (+ bf16 copies of the linears when float32 weights
              calibrate in bf16)
    quantize  the weights in float32 (shears.quantize loads them so) + the Q8_0/Q4_0 blocks; every later
              stage then loads the quantized base through a float32 copy of its dequantized weights
    train     weights + adapter (r_max LoRA in float32: weight, gradient and AdamW's two moments,
              + its bf16 copy under autocast) + activations, per token of B x S (S = data.cutoff_len, an
              upper bound: batches are padded to their longest record): what gradient checkpointing keeps
              of every block and two blocks' internals, or, without it, every block's internals -- bytes
              per token measured (BLOCK_BYTES_PER_TOKEN) -- + the output layer on B x S positions
    search    weights + adapter (float32) + the evaluation batch: the KV cache of a generation
              (2 x layers x batch x (cutoff_len + max_new_tokens) x kv heads x head_dim) or a scored
              forward + the float32 copy of the output layer that float32 logits read
              (+ bf16 copies of the frozen linears when float32 weights evaluate in bf16)
    export    the adapter; the base is memory-mapped and never read when it is stored in the dtype it
              loads in (transformers >= 5 maps safetensors it does not convert), else the weights.
              (A conversion also keeps the stored file mapped while it loads; those pages count in RSS but
              are clean file pages the kernel reclaims under pressure, so the plan does not count them.)
    export --merge  weights (every tensor is read) + one shard of merged matrices (MERGED_SHARD_BYTES)
              + one matrix's float64 merge

plus the process itself (`RUNTIME`: Python, torch, transformers and the stage's imports, measured on
this CPU; a CUDA context on a GPU). benchmarks/bench_memory.py measures every stage of a 1B- or
7B-shaped model and prints these estimates beside the measurements.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch

from .errors import ShearsError
from .qformat import BLOCK_SIZE, BYTES_PER_BLOCK
from .recipe import Recipe
from .search_space import recipe_search_space

# Bounds the stages keep to, defined here so that the estimate and the code agree by construction.
SCORE_CHUNK = 2 ** 22  # Wanda scores this many entries of a matrix at a time (sparsity._prune_linear)
SCORE_BYTES_PER_ENTRY = 22  # fp32 scores, the selection's copy, the ties' int64 running count, bool masks
MERGED_SHARD_BYTES = 512 * 2 ** 20  # export --merge writes merged/ in shards of at most this size

# The process before any weights: RSS of the stage's CLI on a tiny model (benchmarks/bench_memory.py
# --shape tiny), Python 3.11, torch 2.13 CPU, transformers 5.25, on this project's 2-core test machine.
RUNTIME = {"prune": 0.48e9, "quantize": 0.48e9, "train": 0.62e9, "search": 0.56e9, "export": 0.50e9, "export --merge": 0.50e9}
CUDA_CONTEXT = 0.5e9  # what a CUDA context and the allocator's slack take on a GPU (not measured here)

STAGES = ("prune", "quantize", "train", "search", "export", "export --merge")
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def parse_memory(text: str) -> int:
    """'24GiB', '24 GB', '80gib', '512MiB' -> bytes (GB = 1e9, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(b|[kmgt]i?b)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ShearsError(f"memory {text!r} is not a size: write e.g. 24GiB, 24GB or 512MiB")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def detected_memory(device: str) -> int:
    """Total memory of `device`: the GPU's (cuda) or this machine's RAM (cpu)."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# --------------------------------------------------------------------------- counting without weights

@dataclass(frozen=True)
class ModelCount:
    """What the estimate reads of a model: counted on the meta device."""
    name: str
    model_type: str
    params: int  # every parameter once (a tied output layer shares the embedding)
    linear_params: int  # nn.Linear weights other than the output layer: what bf16 copies would copy
    largest_adapted: int  # entries of the largest matrix the adapter adapts (export --merge's float64 matrix)
    block_hessian_entries: int  # sum of in_features^2 over one decoder block's linears (SparseGPT's Hessians)
    head_params: int  # the output layer's weight
    hidden: int
    intermediate: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    stored_dtype: str  # what config.json says the folder's weights are stored in
    adapter_params: int  # the recipe's super-network at r_max


def count_model(recipe: Recipe) -> ModelCount:
    """Count the recipe's model from its config.json, built on the meta device (nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import decoder_layers, resolve_model_path

    path = resolve_model_path(recipe.model)
    try:  # the local copy (a folder, or a hub id already cached) first: no request for what is here
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        try:
            config = AutoConfig.from_pretrained(path)
        except OSError as err:
            raise ShearsError(f"cannot read the config of {recipe.model!r} to plan its memory "
                              f"({str(err).splitlines()[0]}): pass a local model folder") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    space = recipe_search_space(recipe.search_space).bind(model)
    adapted = [model.get_submodule(name).weight.numel() for name in space.module_names()]
    _, blocks = decoder_layers(model)
    block_linears = [m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    hidden = getattr(text, "hidden_size", 0)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return ModelCount(
        name=str(recipe.model), model_type=getattr(config, "model_type", type(model).__name__),
        params=params, linear_params=sum(m.weight.numel() for m in linears),
        largest_adapted=max(adapted, default=0), head_params=head.weight.numel() if head is not None else 0,
        block_hessian_entries=sum(m.in_features ** 2 for m in block_linears),
        hidden=hidden, intermediate=getattr(text, "intermediate_size", 4 * hidden), layers=len(blocks),
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // max(heads, 1),
        vocab=getattr(text, "vocab_size", 0), stored_dtype=str(stored).removeprefix("torch."),
        adapter_params=space.adapter_params(space.maximal()))


# --------------------------------------------------------------------------- the estimate

@dataclass
class Need:
    """One stage's estimate: named terms in bytes, on the device the stage runs on."""
    stage: str
    device: str  # "cpu" | "cuda"
    parts: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # how a term was counted

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def add(self, term: str, nbytes: float, note: str = "") -> None:
        if nbytes:
            self.parts[term] = self.parts.get(term, 0.0) + float(nbytes)
            if note:
                self.notes[term] = note


def weights_dtype(recipe: Recipe, count: ModelCount) -> str:
    from .models import as_dtype

    dtype = as_dtype(recipe.dtype)
    return count.stored_dtype if dtype is None else str(dtype).removeprefix("torch.")


def _bf16(setting, device: str) -> bool:
    from .precision import native_bf16

    return native_bf16(device) if setting == "auto" else bool(setting)


# Bytes one training token costs per decoder block, from the growth of a training step at two depths and
# three widths (bench_memory.py --activations: Llama blocks under the llama space's LoRA, bf16 autocast).
# The tensors themselves -- measured with glibc returning every freed block (MALLOC_MMAP_THRESHOLD_),
# what a GPU's caching allocator holds -- are ~44 hidden + 15 intermediate per block, and ~3 hidden per
# block under gradient checkpointing (the block's input). The RSS of a CPU run under glibc's default
# malloc, which keeps freed blocks for reuse, is ~128 hidden + 12 intermediate, and ~48 hidden per
# checkpointed block. Under checkpointing two blocks' internals are in flight besides.
BLOCK_BYTES_PER_TOKEN = {"cuda": (44, 15), "cpu": (128, 12)}  # (x hidden, x intermediate)
CHECKPOINTED_BYTES_PER_TOKEN = {"cuda": 3, "cpu": 48}  # x hidden, per block
INFERENCE_BYTES_PER_TOKEN = (16, 12)  # one block's forward without autograd: its float32 intermediates


def _block_token_bytes(c: ModelCount, device: str) -> int:
    per_hidden, per_intermediate = BLOCK_BYTES_PER_TOKEN[device]
    return per_hidden * c.hidden + per_intermediate * c.intermediate


def _inference_token_bytes(c: ModelCount) -> int:
    return INFERENCE_BYTES_PER_TOKEN[0] * c.hidden + INFERENCE_BYTES_PER_TOKEN[1] * c.intermediate


def _runtime(need: Need) -> None:
    if need.device == "cuda":
        need.add("runtime", CUDA_CONTEXT, "a CUDA context on the GPU")
    else:
        need.add("runtime", RUNTIME[need.stage], "the process before any weights (measured)")


def _weights(need: Need, recipe: Recipe, c: ModelCount) -> int:
    """Adds the weights; returns bytes per weight."""
    dtype = weights_dtype(recipe, c)
    w = _BYTES.get(dtype, 4)
    need.add("weights", c.params * w, f"{c.params / 1e9:.2f}B parameters in {dtype}")
    return w


def _quantized(recipe: Recipe) -> bool:
    return getattr(recipe, "quantization", None) is not None and recipe.quantization.scheme != "none"


def _block_bytes(recipe: Recipe, c: ModelCount) -> float:
    """The quantized base's blocks (every weight counted as quantized: an upper bound)."""
    return c.params * BYTES_PER_BLOCK[recipe.quantization.scheme] / BLOCK_SIZE


def _quantize_need(recipe: Recipe, c: ModelCount) -> Need:
    need = Need("quantize", "cpu")  # shears.quantize loads the base on the CPU, in float32
    _runtime(need)
    need.add("weights", c.params * 4, f"{c.params / 1e9:.2f}B parameters in float32 (as shears.quantize loads them)")
    need.add("quantized", _block_bytes(recipe, c), f"{recipe.quantization.scheme} blocks")
    return need


def _dequantizing(need: Need, recipe: Recipe, c: ModelCount) -> None:
    """A quantized base loads through a float32 copy of its dequantized weights (shears.models)."""
    if _quantized(recipe):
        need.add("transient", c.params * 4 + _block_bytes(recipe, c),
                 "the quantized base's blocks and their float32 dequantization while it loads")


def _prune_need(recipe: Recipe, c: ModelCount) -> Need:
    s, bf16 = recipe.sparsity, _bf16(recipe.training.bf16, "cpu")
    need = Need("prune", "cpu")  # prune_to_folder loads the model on the CPU
    _runtime(need)
    w = _weights(need, recipe, c)
    if s.method != "magnitude":  # the calibrated methods: Wanda, SparseGPT
        need.add("activations", s.nsamples * s.seqlen * c.hidden * w,
                 f"Wanda's captured hidden states, {s.nsamples} x {s.seqlen} x {c.hidden}, in the weights' dtype")
        need.add("activations", s.batch_size * s.seqlen * _inference_token_bytes(c), "one block's forward")
        if bf16 and w == 4:
            need.add("bf16 copies", c.linear_params * 2, "the linears in bf16 for the calibration forward")
    if s.method == "sparsegpt":
        need.add("transient", c.block_hessian_entries * 4, "one block's input Hessians (in x in, float32)")
    else:
        need.add("transient", min(SCORE_CHUNK, c.largest_adapted or SCORE_CHUNK) * SCORE_BYTES_PER_ENTRY,
                 f"scores of {SCORE_CHUNK} entries of one matrix")
    return need


def _train_need(recipe: Recipe, c: ModelCount, device: str) -> Need:
    t, bf16 = recipe.training, _bf16(recipe.training.bf16, device)
    need = Need("train", device)
    _runtime(need)
    _weights(need, recipe, c)
    _dequantizing(need, recipe, c)
    need.add("adapter", c.adapter_params * (16 + (2 if bf16 else 0)),
             f"{c.adapter_params / 1e6:.1f}M LoRA parameters x (weight, gradient, AdamW's 2 moments in float32"
             + (" + a bf16 copy)" if bf16 else ")"))
    tokens = t.per_device_train_batch_size * recipe.data.cutoff_len
    block = tokens * _block_token_bytes(c, device)
    if t.gradient_checkpointing:  # (never more than keeping everything: a shallow model gains nothing)
        kept = c.layers * tokens * CHECKPOINTED_BYTES_PER_TOKEN[device] * c.hidden
        need.add("activations", min(kept + 2 * block, c.layers * block),
                 f"gradient checkpointing: what {c.layers} blocks keep + two blocks' internals, {tokens} tokens "
                 "(batch x data.cutoff_len)")
    else:
        need.add("activations", c.layers * block,
                 f"{c.layers} blocks' internals x {tokens} tokens (batch x data.cutoff_len), no checkpointing")
    need.add("activations", tokens * c.vocab * 12, "output layer: logits, log-softmax and their gradient")
    return need


def _search_need(recipe: Recipe, c: ModelCount, device: str) -> Need:
    e, bf16 = recipe.evaluation, _bf16(recipe.evaluation_bf16(), device)
    need = Need("search", device)
    _runtime(need)
    w = _weights(need, recipe, c)
    _dequantizing(need, recipe, c)
    need.add("adapter", c.adapter_params * 4, "LoRA in float32")
    if e.task == "math":
        length = recipe.data.cutoff_len + e.max_new_tokens
        need.add("activations", 2 * c.layers * e.batch_size * length * c.kv_heads * c.head_dim * (2 if bf16 else w),
                 f"KV cache: {e.batch_size} sequences x {length} tokens")
    else:
        need.add("activations", e.batch_size * recipe.data.cutoff_len * (_inference_token_bytes(c) + c.vocab * 4),
                 "a scored forward and its float32 logits")
    if w != 4:
        need.add("transient", c.head_params * 4, "the output layer in float32 (float32 logits)")
    if bf16 and w == 4:
        need.add("bf16 copies", c.linear_params * 2, "the frozen linears held in bf16 while evaluating")
    return need


def _export_needs(recipe: Recipe, c: ModelCount) -> list[Need]:
    plain, merge = Need("export", "cpu"), Need("export --merge", "cpu")  # export runs on the CPU
    dtype = weights_dtype(recipe, c)
    # the base export loads: RUN/sparse_base, written in the recipe's dtype, or the model as stored
    stored = dtype if recipe.sparsity.sparsity > 0 else c.stored_dtype
    for need in (plain, merge):
        _runtime(need)
        need.add("adapter", c.adapter_params * 4 * 2, "LoRA in float32 and the subnet's slices")
    if dtype != stored:
        _weights(plain, recipe, c)
        plain.notes["weights"] += f", converted from {stored} as they load"
    weights = _weights(merge, recipe, c) * c.params
    for need in (plain, merge):
        _dequantizing(need, recipe, c)
    merge.add("transient", min(MERGED_SHARD_BYTES, weights), "one shard of merged matrices")
    merge.add("transient", c.largest_adapted * 11, "one matrix merged in float64")
    return [plain, merge]


def estimate(recipe: Recipe, count: ModelCount, train_device: str = "cpu") -> list[Need]:
    """Every stage's need for `recipe` on `count`; training and the search run on `train_device` (the
    default device, as their CLIs choose), pruning and export on the CPU, as theirs do."""
    needs = [_prune_need(recipe, count)] if recipe.sparsity.sparsity > 0 else []
    needs += [_quantize_need(recipe, count)] if _quantized(recipe) else []
    return needs + [_train_need(recipe, count, train_device), _search_need(recipe, count, train_device),
                    *_export_needs(recipe, count)]


# --------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    count: ModelCount
    dtype: str
    needs: list[Need]
    memory: dict[str, int]  # device -> bytes it has
    detected: dict[str, bool]  # device -> whether `memory` was detected (False: given)
    train_device: str  # where training and the search run

    def need(self, stage: str) -> Need | None:
        return next((n for n in self.needs if n.stage == stage), None)

    def fits(self, need: Need) -> bool:
        return need.total <= self.memory[need.device]

    def format(self) -> str:
        c = self.count
        lines = [f"memory plan for {c.name} ({c.model_type}, {c.params / 1e9:.2f}B parameters, {self.dtype} "
                 f"weights {gb(c.params * _BYTES.get(self.dtype, 4))}; adapter {c.adapter_params / 1e6:.1f}M at r_max)"]
        for device, total in self.memory.items():
            how = "detected" if self.detected[device] else "given"
            lines.append(f"  {device}: {total / 2 ** 30:.1f} GiB ({gb(total)}, {how})")
        header = f"  {'stage':<15} {'device':<6} {'needs':>9}  {'fits':<4}  terms"
        lines += [header, "  " + "-" * (len(header) + 40)]
        for need in self.needs:
            terms = ", ".join(f"{term} {v / 1e9:.2f}" for term, v in need.parts.items())
            lines.append(f"  {need.stage:<15} {need.device:<6} {gb(need.total):>9}  "
                         f"{'yes' if self.fits(need) else 'NO':<4}  {terms}")
        notes = {f"{term}: {note}" for need in self.needs for term, note in need.notes.items()}
        lines += ["  (GB = 1e9 bytes; terms in GB)"] + [f"    {n}" for n in sorted(notes)]
        return "\n".join(lines)


def make_plan(recipe: Recipe, device_memory: int | None = None, count: ModelCount | None = None) -> Plan:
    """The plan for `recipe` on this machine: training and the search on the GPU when there is one, else
    the CPU; `device_memory` replaces the detected memory of that device."""
    train_device = "cuda" if torch.cuda.is_available() else "cpu"
    count = count or count_model(recipe)
    memory = {"cpu": detected_memory("cpu")}
    detected = {"cpu": True}
    if train_device == "cuda":
        memory["cuda"], detected["cuda"] = detected_memory("cuda"), True
    if device_memory is not None:
        memory[train_device], detected[train_device] = int(device_memory), False
    return Plan(count, weights_dtype(recipe, count), estimate(recipe, count, train_device), memory, detected,
                train_device)


def _fix_steps(recipe: Recipe, stage: str) -> list[dict[str, object]]:
    """The recipe changes that may lower `stage`'s need, in the order they are suggested."""
    t, s, e = recipe.training, recipe.sparsity, recipe.evaluation
    steps: list[dict[str, object]] = []
    if recipe.dtype in ("float32", "fp32", "auto"):
        steps.append({"dtype": "bfloat16"})
    if stage == "train":
        if not t.gradient_checkpointing:
            steps.append({"training.gradient_checkpointing": True})
        batch, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
        while batch > 1:  # the same effective batch: fewer sequences per step, more accumulation
            batch, accumulation = batch // 2, accumulation * 2
            steps.append({"training.per_device_train_batch_size": batch,
                          "training.gradient_accumulation_steps": accumulation})
    elif stage == "prune":
        nsamples = s.nsamples
        while s.method != "magnitude" and nsamples > 16:
            nsamples //= 2
            steps.append({"sparsity.nsamples": nsamples})
    elif stage == "search":
        batch = e.batch_size
        while batch > 1:
            batch //= 2
            steps.append({"evaluation.batch_size": batch})
    return steps


def _with(recipe: Recipe, changes: dict[str, object]) -> Recipe:
    """A copy of `recipe` with dotted keys changed."""
    recipe = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training),
                                 sparsity=dataclasses.replace(recipe.sparsity),
                                 evaluation=dataclasses.replace(recipe.evaluation))
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(recipe, section) if section else recipe, name, value)
    return recipe


def _described(changes: dict[str, object]) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    kept = {k: v for k, v in changes.items() if k != "training.gradient_accumulation_steps"}
    text = ", ".join(f"{k}: {value(v)}" for k, v in kept.items())
    if "training.gradient_accumulation_steps" in changes:
        text += f" (gradient_accumulation_steps: {changes['training.gradient_accumulation_steps']}, the same effective batch)"
    return text


def fit_advice(recipe: Recipe, plan: Plan, need: Need) -> tuple[str, bool]:
    """Why `need` does not fit its device and the recipe setting(s) -- dtype, gradient checkpointing, batch
    size, calibration samples -- that would make it fit (each suggested change lowers the need; they are
    tried in that order). Returns (one line, whether some setting fits)."""
    available = plan.memory[need.device]
    where = f"the {need.device} has {available / 2 ** 30:.1f} GiB"
    changes: dict[str, object] = {}
    lowest = need.total
    for step in _fix_steps(recipe, need.stage):
        after = next(n for n in estimate(_with(recipe, {**changes, **step}), plan.count, plan.train_device)
                     if n.stage == need.stage).total
        if after >= lowest:
            continue
        changes, lowest = {**changes, **step}, after
        if lowest <= available:
            return (f"{need.stage} needs ~{gb(need.total)} in {plan.dtype} but {where}: set "
                    f"{_described(changes)} (then ~{gb(lowest)})"), True
    return (f"{need.stage} needs ~{gb(need.total)} in {plan.dtype} but {where}, more than any setting "
            "saves: use a device with more memory or a smaller model (--plan shows every term)"), False


def refuse_unless_fits(recipe: Recipe, plan: Plan, stages: tuple[str, ...] = ("prune", "quantize", "train")) -> None:
    """A one-line ShearsError when one of `stages` needs more than its device has (fit_advice says why and
    what would fit)."""
    for stage in stages:
        need = plan.need(stage)
        if need is None or plan.fits(need):
            continue
        advice, fixable = fit_advice(recipe, plan, need)
        raise ShearsError(advice + ("; python -m shears.train_supernet --plan shows every stage" if fixable else ""))
