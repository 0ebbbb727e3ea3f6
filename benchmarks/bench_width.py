"""Elastic base width (LoNAS/EFTNAS) vs rank-only NLS on smollm2-135m: do subnets get faster, and at what loss?

    python benchmarks/bench_width.py [--steps 120] [--budget 16] [--out runs/bench_width] [--threads 1]
    python benchmarks/bench_width.py --curve --steps 120 [--out runs/bench_width]   (the gap at each checkpoint)
    python benchmarks/bench_width.py --train-only rank & python benchmarks/bench_width.py --train-only width
                                    (both arms trained side by side, one thread each; then the plain command)
    python benchmarks/bench_width.py --static-width 864 ...   (adds the `static` arm: see below)

Two super-networks are trained with the same budget (steps x batch of the same LLM-Adapters
commonsense training records, seed, lr, schedule; dense base, no pruning, so speed comes from width
alone), in the content answer format (the response is the option's text, as experiment_compression.py: in the
label format "the correct answer is answerN" the loss is mostly template tokens that any subnet learns,
so a loss within 5% would say nothing about the answers): `rank` on search_spaces/llama.yaml (Shears' rank groups) and `width` on
search_spaces/llama-width.yaml (the same rank groups + each block's MLP width in {100, 75, 50}%,
channels ordered by first-order importance before training). The width super-network is searched
over (validation loss, latency predicted from the run's measured per-site latency table); every
front point is exported as a physically smaller model, its logits checked against the super-network
subnet, and its forward time measured against the unpruned base model, interleaved in this process
on the same batch. The target: a subnet >= 1.3x faster than the base within 5% of the rank-only
maximal subnet's validation loss.

`--static-width C` adds a third arm, `static`: the same budget spent on one subnet only, every block's MLP
at C channels and LoRA rank 32 (a plain LoRA on the importance-ordered, statically narrowed model, as
structured pruning with LoRA recovery would train it). No subnet of the width super-network at that
shape has had more training of its own, so its loss says whether the target is reachable at this
budget at all; it is exported and timed with the others.

`--inplace` adds the arm `width_inplace`: the width super-network trained with the sandwich rule and
in-place distillation (training.inplace_distill: the maximal subnet learns from the labels, the minimal
and a random subnet from its soft labels, in the same step), at the same optimizer steps; the table
then gives the 75% and 50% uniform-width subnets' validation loss with and without it, and the
training wall-time ratio (a sandwich step trains three subnets).

Timings take /tmp/shears-timing.lock (training and evaluation do not), so no other timing benchmark
runs at the same time. Each stage is skipped when its output exists, so a crash costs one stage.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from shears.evaluate import evaluate  # noqa: E402
from shears.export import export_subnets  # noqa: E402
from shears.models import load_model  # noqa: E402
from shears.recipe import load_recipe  # noqa: E402
from shears.run import load_run  # noqa: E402
from shears.search import Evaluator, History, OptunaBackend, search  # noqa: E402
from shears.progress import progress  # noqa: E402
from shears.search.cli import problem_from_run  # noqa: E402
from shears.train_supernet import train_supernet  # noqa: E402

RECIPE = REPO / "recipes" / "smollm2-commonsense.yaml"
TARGET_SPEEDUP, LOSS_SLACK = 1.3, 0.05


@contextmanager
def timing_lock():
    with open("/tmp/shears-timing.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recipe_for(space: str, args, run_dir: Path, inplace: bool = False):
    distill = {"training.strategy": "sandwich", "training.inplace_distill": True} if inplace else {}
    return load_recipe(RECIPE, {**distill,
        "search_space": space, "output_dir": str(run_dir), "sparsity.sparsity": 0.0,
        "data.train": ["{data_dir}/commonsense/arc-easy_train.json", "{data_dir}/commonsense/openbookqa_train.json"],
        "data.answer_format": "content", "data.cutoff_len": 128, "data.val_size": args.val,
        "training.val_limit": args.val,
        "training.max_steps": args.steps, "training.per_device_train_batch_size": 8,
        "training.gradient_accumulation_steps": 1, "training.learning_rate": 1e-3, "training.save_steps": 40,
        "search.latency_batch_size": args.batch, "search.latency_seq_len": args.seq_len})


def train(space: str, args, run_dir: Path) -> float:
    """Train one arm (skipped when its super-network exists); the `width_inplace` arm distils in place."""
    if (run_dir / "supernet" / "adapter_config.json").is_file():
        return json.loads((run_dir / "bench_train.json").read_text())["seconds"]
    start = time.perf_counter()
    train_supernet(recipe_for(space, args, run_dir, inplace=run_dir.name == "width_inplace"), run_dir, resume=(run_dir / "recipe.yaml").is_file())
    seconds = time.perf_counter() - start
    (run_dir / "bench_train.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def static_space(channels: int) -> dict:
    """search_spaces/llama-width.yaml with one choice per group: every rank r_max, every block's MLP at
    `channels`. Its only subnet is a plain LoRA on the narrowed model."""
    space = yaml.safe_load((REPO / "search_spaces" / "llama-width.yaml").read_text())
    for group in space["groups"]:
        group["choices"] = [channels] if group.get("kind") == "width" else [space["r_max"]]
    return space


def val_loss(run, config: dict) -> float:
    run.supernet.activate(config)
    return evaluate(run.supernet, run.tokenizer, run.validation_records, "loss", batch_size=16, progress=False,
                    cutoff_len=run.recipe.data.cutoff_len)["loss"]


def uniform_width(space, share: float) -> dict:
    """The maximal subnet with every block's MLP cut to `share` of its channels."""
    return {**space.maximal(), **{k: round(share * space.sites[0].channels) for k in space.width_keys}}


def run_at_step(run_dir: Path, step: int, scratch: Path) -> Path:
    """A run folder whose super-network is RUN's checkpoint at `step`: links to RUN's files, only the
    adapter weights taken from checkpoints/checkpoint-STEP (the search space and channel order are RUN's)."""
    out = scratch / f"{run_dir.name}-{step}"
    out.mkdir()
    for item in run_dir.iterdir():
        if item.name != "supernet":
            (out / item.name).symlink_to(item.resolve())
    (out / "supernet").mkdir()
    for item in (run_dir / "supernet").iterdir():
        source = run_dir / "checkpoints" / f"checkpoint-{step}" / item.name if item.name == "adapter_model.safetensors" \
            else item
        (out / "supernet" / item.name).symlink_to(source.resolve())
    return out


def training_curve(out: Path, args) -> None:
    """The gap to the rank-only maximal subnet at every checkpoint both arms saved, and at the end."""
    steps = sorted({int(p.name.split("-")[1]) for p in (out / "rank" / "checkpoints").glob("checkpoint-*")}
                   & {int(p.name.split("-")[1]) for p in (out / "width" / "checkpoints").glob("checkpoint-*")}
                   - {args.steps})
    print(f"\nvalidation loss on the same {args.val} records, uniform MLP widths at full ranks, by training step "
          f"(a checkpoint before the end has not decayed its learning rate):")
    with tempfile.TemporaryDirectory() as tmp:
        for step in [*steps, args.steps]:
            at = {arm: out / arm if step == args.steps else run_at_step(out / arm, step, Path(tmp))
                  for arm in ("rank", "width")}
            rank_run = load_run(at["rank"])
            rank_max = val_loss(rank_run, rank_run.supernet.maximal())
            del rank_run
            width_run = load_run(at["width"])
            space = width_run.supernet.space
            row = [f"step {step:>4}: rank-only maximal {rank_max:.4f}"]
            for share in (1.0, 0.75, 0.5):
                loss = val_loss(width_run, uniform_width(space, share))
                row.append(f"width {share:.0%} {loss:.4f} ({loss / rank_max - 1:+.1%})")
            del width_run
            print("; ".join(row), flush=True)


def inplace_table(out: Path, seconds: dict, rank_max: float, args) -> None:
    """Uniform-width subnets of the width super-network trained without and with in-place distillation."""
    print(f"\nin-place distillation ({args.steps} optimizer steps each; training wall time width_inplace / width "
          f"{seconds['width_inplace'] / seconds['width']:.2f}x): validation loss, vs the rank-only maximal {rank_max:.4f}")
    for arm in ("width", "width_inplace"):
        run = load_run(out / arm)
        losses = {share: val_loss(run, uniform_width(run.supernet.space, share)) for share in (0.75, 0.5)}
        row = [f"{loss:.4f} at {share:.0%} width ({loss / rank_max - 1:+.1%})" for share, loss in losses.items()]
        print(f"  {arm:<14} " + "; ".join(row), flush=True)
        del run


def forward_seconds(models: dict, ids: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Interleaved: every round times each model once, so load from other processes hits all alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(input_ids=ids, use_cache=False)  # warm-up
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def widths_summary(space, config: dict) -> str:
    widths = list(space.site_widths(config).values())
    full = space.sites[0].channels
    return f"mean {sum(widths) / len(widths) / full:.0%} " + " ".join(
        f"{w / full:.0%}x{widths.count(w)}" for w in sorted(set(widths), reverse=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--budget", type=int, default=16, help="search evaluations of the width super-network")
    p.add_argument("--val", type=int, default=96, help="validation records (loss objective and the table)")
    p.add_argument("--batch", type=int, default=4, help="timed forward: batch x seq-len tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench_width")
    p.add_argument("--inplace", action="store_true",
                   help="also train `width_inplace` (sandwich + in-place distillation) and compare its widths")
    p.add_argument("--train-only", choices=("rank", "width", "static", "width_inplace"),
                   help="train one arm and stop: one process per arm, one thread each, train the arms side by side")
    p.add_argument("--static-width", type=int,
                   help="also train and time the `static` arm: every MLP at this many channels, rank 32 only")
    p.add_argument("--curve", action="store_true",
                   help="only print the trained arms' gap at each saved checkpoint (does more training close it?)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.curve:
        training_curve(out, args)
        return

    spaces = {"rank": "llama", "width": "llama-width"}
    if args.static_width:
        spaces["static"] = static_space(args.static_width)
    if args.inplace:
        spaces["width_inplace"] = "llama-width"
    if args.train_only:
        if args.train_only not in spaces:
            raise SystemExit(f"--train-only {args.train_only} needs --static-width or --inplace")
        train(spaces[args.train_only], args, out / args.train_only)
        return
    seconds = {arm: train(space, args, out / arm) for arm, space in spaces.items()}
    rank_run, width_run = load_run(out / "rank"), load_run(out / "width")
    rank_max = val_loss(rank_run, rank_run.supernet.maximal())
    del rank_run
    if args.inplace:
        inplace_table(out, seconds, rank_max, args)
    static = None
    if args.static_width:
        static_run = load_run(out / "static")
        config = static_run.supernet.maximal()
        folder = export_subnets(static_run, {"static": config}, out / "static" / "export", force=True)[0]
        static = {"loss": val_loss(static_run, config), "model": load_model(folder.folder / "merged").eval(),
                  "widths": widths_summary(static_run.supernet.space, config)}
        del static_run

    with timing_lock():  # the latency table is measured on first use
        problem = problem_from_run(width_run, "loss,latency", eval_limit=None, batch_size=16)
    space = width_run.supernet.space
    search_dir = out / "width" / "search"
    search_dir.mkdir(parents=True, exist_ok=True)
    # Besides the search's maximal/heuristic/minimal anchors: every block at 75% and at 50% width, full ranks
    history = History(search_dir / "history.jsonl", problem.objectives)
    with progress(total=2, desc="uniform-width subnets", unit="eval") as bar:
        evaluator = Evaluator(problem, history, "bench:uniform", bar)
        for share in (0.75, 0.5):
            evaluator.evaluate(uniform_width(space, share))
    backend = OptunaBackend(sampler="tpe", storage=f"sqlite:///{(out / 'width' / 'search' / 'study.db').resolve()}",
                            seed=0)
    result = search(problem, search_dir, args.budget, backend, plot=False)
    front = result.front

    configs = {f"front-{i}": row["config"] for i, row in enumerate(front)}
    export_dir = out / "export"
    folders = export_subnets(width_run, configs, export_dir, force=True)
    ids = torch.randint(0, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    exported, params = {}, {}
    diffs = {key: {} for key in ("fp32", "fp32 floor", "float64")}
    net = width_run.supernet
    for name, exported_folder in zip(configs, folders):
        model = load_model(exported_folder.folder / "merged").eval()
        net.activate(configs[name])
        with torch.no_grad():
            ours, theirs = model(input_ids=ids[:1]).logits.double(), net.model(input_ids=ids[:1]).logits.double()
            # float64 evaluations (fp32 weights upcast exactly): what differs is only the export's stored weights
            exact = net.model.double()(input_ids=ids[:1]).logits
            ours_exact = model.double()(input_ids=ids[:1]).logits
            net.model.float(), model.float()
        diffs["fp32"][name] = float((ours - theirs).abs().max())
        diffs["fp32 floor"][name] = float((theirs - exact).abs().max())  # the super-network's own fp32 error
        diffs["float64"][name] = float((ours_exact - exact).abs().max())
        exported[name] = model
        params[name] = sum(p.numel() for p in model.parameters())
    del width_run
    base = load_model(RECIPE_MODEL).eval()
    timed = {"base": base, **exported, **({"static": static["model"]} if static else {})}
    with timing_lock():
        times = forward_seconds(timed, ids, args.reps)
    base_t = median(times["base"])

    print(f"\nsmollm2-135m, LLM-Adapters ARC-e + OBQA train, {args.steps} steps x 8 records each arm, dense base; "
          f"val loss on {args.val} held-out training records; torch threads {torch.get_num_threads()}")
    print(f"training wall time: rank-only {seconds['rank']:.0f} s, width {seconds['width']:.0f} s "
          f"(ratio {seconds['width'] / seconds['rank']:.2f})"
          + (f", static {seconds['static']:.0f} s" if static else ""))
    print(f"rank-only maximal subnet: val loss {rank_max:.4f}")
    print(f"search: {len(result.history)} evaluations, {len(front)} front points over (val loss, predicted latency)")
    print(f"forward of {args.batch} x {args.seq_len} tokens, median of {args.reps} interleaved rounds; "
          f"base (unpruned, full width) {base_t * 1e3:.1f} ms, {sum(p.numel() for p in base.parameters()):,} params\n")
    header = f"{'subnet':<9} {'widths':<28} {'val loss':>8} {'vs rank-max':>11} {'pred ms':>8} {'meas ms':>8} " \
             f"{'speed-up':>8} {'params':>12} {'|dlogit|':>9}"
    print(header)
    hits = []
    for name, row in zip(configs, front):
        loss = row["objectives"]["loss"]
        t = median(times[name])
        rel = loss / rank_max - 1
        speed = base_t / t
        spread = (max(times[name]) - min(times[name])) / t
        if speed >= TARGET_SPEEDUP and rel <= LOSS_SLACK:
            hits.append(name)
        print(f"{name:<9} {widths_summary(space, configs[name]):<28} {loss:>8.4f} {rel:>+10.1%} "
              f"{row['objectives']['latency'] * 1e3:>8.1f} {t * 1e3:>8.1f} {speed:>7.2f}x {params[name]:>12,} "
              f"{diffs['fp32'][name]:>9.1e}   (spread {spread:.0%})")
    if static:
        t = median(times["static"])
        rel = static["loss"] / rank_max - 1
        print(f"{'static':<9} {static['widths']:<28} {static['loss']:>8.4f} {rel:>+10.1%} {'':>8} {t * 1e3:>8.1f} "
              f"{base_t / t:>7.2f}x {sum(q.numel() for q in static['model'].parameters()):>12,}   (the `static` arm: "
              f"this one subnet trained for all {args.steps} steps)")
    print(f"\ntarget: a subnet >= {TARGET_SPEEDUP}x faster than the base within {LOSS_SLACK:.0%} of the rank-only "
          f"maximal loss -> {'met by ' + ', '.join(hits) if hits else 'NOT met'}")
    worst = {key: max(values.values()) if values else math.nan for key, values in diffs.items()}
    print(f"exported vs super-network subnet logits, max |diff| over the front (target <= 1e-4): "
          f"{worst['float64']:.2e} both evaluated in float64 (the export's fp32 weights upcast: only their rounding "
          f"shows); {worst['fp32']:.2e} both in fp32, where the subnet's own fp32 logits are up to "
          f"{worst['fp32 floor']:.2e} from its float64 ones")
    print(f"wrote {export_dir} ({len(folders)} smaller models) and {search_dir}")


RECIPE_MODEL = "smollm2-135m"

if __name__ == "__main__":
    main()
