"""Wall time of 1 vs N `python -m shears.search` workers spending the same budget on one study.

    python benchmarks/bench_workers.py [--workers 3] [--budget 12] [--repeats 2] [--storage journal|URL]

Trains a tiny super-network once (random 2-layer Llama, character tokenizer; each evaluation
generates answers for --val-size validation records), then alternates 1-worker and N-worker searches,
each on a fresh study and history, so both see the same machine load. Every worker process runs one
torch thread, so N workers can use at most min(N, cores) cores: on a 2-core machine 3 workers can at
best halve the wall time; on 3 free cores the ideal is 3x. Process start-up (importing torch and
transformers, loading the run) is part of each worker's time, as it is for a user.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def train(root: Path, val_size: int) -> Path:
    from conftest import make_tiny_model, make_tiny_tokenizer
    from test_train_supernet import tiny_recipe

    from shears.recipe import load_recipe
    from shears.train_supernet import train_supernet

    model_dir = root / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    recipe = load_recipe(tiny_recipe(model_dir, root, max_steps=2),
                         {"data.val_size": val_size, "evaluation.max_new_tokens": 32, "evaluation.batch_size": 8})
    run = root / "run"
    train_supernet(recipe, run)
    return run


def search(run: Path, workers: int, budget: int, storage: str, tag: str) -> float:
    """Seconds from starting `workers` processes on a fresh study until the last one exits."""
    shutil.rmtree(run / "search", ignore_errors=True)
    if storage == "journal":
        storage = str(run / "search" / "study.log")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "shears.search", "--run", str(run), "--budget", str(budget),
                               "--storage", storage, "--study-name", f"bench-{tag}", "--seed", str(seed),
                               "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed:\n{err[-2000:]}")
    seconds = time.perf_counter() - start
    lines = [line for line in (run / "search" / "history.jsonl").read_text().splitlines() if line.strip()]
    assert len(lines) == budget, (len(lines), budget)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--budget", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--val-size", type=int, default=24, help="validation records each evaluation generates for")
    p.add_argument("--storage", default="journal", help="journal, or an RDB URL such as postgresql://...")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        run = train(Path(tmp), args.val_size)
        times: dict[int, list[float]] = {1: [], args.workers: []}
        for repeat in range(args.repeats):
            for n in (1, args.workers):  # interleaved: both see the same load
                times[n].append(search(run, n, args.budget, args.storage, f"{repeat}-{n}-{time.time_ns()}"))
                print(f"repeat {repeat}: {n} worker(s) {times[n][-1]:.1f} s", flush=True)
    one, many = statistics.median(times[1]), statistics.median(times[args.workers])
    print(f"\nbudget {args.budget}, storage {args.storage}, {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"1 worker: median {one:.1f} s of {times[1]}")
    print(f"{args.workers} workers: median {many:.1f} s of {times[args.workers]}")
    print(f"speed-up {one / many:.2f}x (ideal min({args.workers}, free cores))")


if __name__ == "__main__":
    main()
