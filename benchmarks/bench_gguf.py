"""Serving a subnet on a CPU: llama.cpp (Q4_0 and f16 base + LoRA GGUF) vs transformers + PEFT (bf16, fp32).

    flock /work/locks/heavy.lock python benchmarks/bench_gguf.py [--rounds 3] [--prompt-tokens 128]
                                  [--new-tokens 64] [--threads 1] [--out runs/bench_gguf]

The model is smollm2-135m with a LoRA the size of a searched subnet (rank 16 on q/k/v/up/down of every block,
B random so the adapter is really applied), written by shears' own code paths: the PEFT folder as
shears.export writes one, the GGUF files by shears.gguf_export (llama.cpp's converters). The Q4_0 base is
quantized by shears.qformat (llama.cpp's block format, byte-identical to the gguf package) into a quantized
model folder, every block linear in Q4_0 and embeddings/norms kept, and exported through the same
substitution of blocks a quantized run's base takes -- not by llama.cpp's llama-quantize.

Each engine runs batch 1 on the same prompt (the same token ids): prompt tokens/s is the prompt's forward
(prefill), decode tokens/s is greedy generation of --new-tokens one token at a time with the KV cache. Every
measurement is a fresh subprocess (its peak RSS is the engine's own), and the engines are interleaved
round by round, so a slow moment of the shared machine hits them alike; the median over rounds is printed,
with each engine's ratio to transformers bf16 + PEFT measured in the same run. The same --threads for all.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENGINES = ("llama.cpp Q4_0 + LoRA", "llama.cpp f16 + LoRA", "transformers bf16 + PEFT", "transformers fp32 + PEFT")
PEER = "transformers bf16 + PEFT"
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32


def prepare(out: Path) -> dict:
    """The fp32 folder, a PEFT adapter, a qformat Q4_0 folder and the GGUF files (skipped when present)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from shears import qformat
    from shears.export import write_subnet_adapter
    from shears.gguf_export import (convert_adapter, convert_model, converter_dir, fold_scales)
    from shears.elastic import lora_config
    from shears.models import load_model, resolve_model_path

    paths = {"fp32": Path(resolve_model_path("smollm2-135m")), "peft": out / "peft", "q4_0": out / "q4_0",
             "f16.gguf": out / "base-f16.gguf", "q4_0.gguf": out / "base-q4_0.gguf", "lora.gguf": out / "adapter.gguf",
             "bf16": out / "bf16"}
    out.mkdir(parents=True, exist_ok=True)
    converter = converter_dir()
    model = load_model(paths["fp32"])
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, module in model.named_modules():
        if name.endswith(TARGETS) and isinstance(module, torch.nn.Linear):
            factors[name] = (torch.randn(RANK, module.in_features, generator=g) / module.in_features ** 0.5,
                             torch.randn(module.out_features, RANK, generator=g) * 0.02)
    if not paths["peft"].exists():
        paths["peft"].mkdir()
        config = lora_config(dict.fromkeys(factors, RANK), ALPHA, RANK, 0.0, inference_mode=True,
                             base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
        write_subnet_adapter(paths["peft"], factors, config)
    if not paths["bf16"].exists():  # what a bf16 folder weighs
        model.to(torch.bfloat16).save_pretrained(paths["bf16"])
    if not paths["q4_0"].exists():
        shutil.copytree(paths["fp32"], paths["q4_0"])
        tensors = load_file(paths["q4_0"] / "model.safetensors")
        stored, record = {}, {"format": qformat.QUANT_FORMAT, "scheme": "q4_0", "quantized": {}, "kept": {}, "tied": {}}
        for name, t in tensors.items():
            if ".layers." in name and name.endswith("proj.weight"):
                stored[name + qformat.BLOCKS_SUFFIX] = qformat.quantize(t, "q4_0")
                record["quantized"][name] = {"shape": list(t.shape), "scheme": "q4_0"}
            else:
                stored[name], record["kept"][name] = t, "embeddings and norms stay at full precision"
        save_file(stored, paths["q4_0"] / "model.safetensors", metadata={"format": "pt"})
        (paths["q4_0"] / qformat.QUANT_FILE).write_text(json.dumps(record))
    scratch = out / "scratch"
    for key, folder in (("f16.gguf", paths["fp32"]), ("q4_0.gguf", paths["q4_0"])):
        if not paths[key].exists():
            shutil.rmtree(scratch, ignore_errors=True)
            convert_model(folder, paths[key], "f16", converter, scratch)
    if not paths["lora.gguf"].exists():
        shutil.rmtree(scratch, ignore_errors=True)
        convert_adapter(fold_scales(factors, ALPHA / RANK, ALPHA), ALPHA, paths["fp32"], paths["lora.gguf"],
                        converter, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return {k: str(v) for k, v in paths.items()}


def prompt_ids(paths: dict, n: int) -> list[int]:
    from shears.data import format_prompt, load_records
    from shears.models import load_tokenizer

    tokenizer = load_tokenizer(paths["fp32"])
    text = "".join(format_prompt(r) for r in load_records("builtin:arithmetic?n=64&seed=1"))
    return tokenizer(text).input_ids[:n]


def measure(engine: str, paths: dict, prompt: list[int], new_tokens: int, threads: int) -> dict:
    """One engine, in this (fresh) process: prefill and decode seconds, peak RSS."""
    if engine.startswith("llama.cpp"):
        import llama_cpp
        import numpy as np

        base = paths["q4_0.gguf"] if "Q4_0" in engine else paths["f16.gguf"]
        llm = llama_cpp.Llama(model_path=base, lora_path=paths["lora.gguf"], n_ctx=len(prompt) + new_tokens + 8,
                              n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        llm.eval(prompt[:8])  # warm-up
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode = time.perf_counter() - start
        llm.close()
    else:
        import torch
        from peft import PeftModel

        from shears.models import load_model

        torch.set_num_threads(threads)
        dtype = torch.bfloat16 if "bf16" in engine else torch.float32
        model = PeftModel.from_pretrained(load_model(paths["fp32"], dtype=dtype), paths["peft"]).eval()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model(input_ids=ids[:, :8])  # warm-up
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            decode = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_s": decode, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def size(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench_gguf")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one engine in a subprocess
    args = p.parse_args()
    out = Path(args.out)
    if args.measure:
        setup = json.loads((out / "setup.json").read_text())
        print(json.dumps(measure(args.measure, setup["paths"], setup["prompt"], args.new_tokens, args.threads)))
        return
    paths = prepare(out)
    prompt = prompt_ids(paths, args.prompt_tokens)
    (out / "setup.json").write_text(json.dumps({"paths": paths, "prompt": prompt}))
    results: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES if r % 2 == 0 else reversed(ENGINES):
            cmd = [sys.executable, __file__, "--measure", engine, "--out", str(out), "--new-tokens",
                   str(args.new_tokens), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {engine}: {results[engine][-1]}", file=sys.stderr)
    n_prompt = len(prompt)
    rows = {}
    for engine, runs in results.items():
        rows[engine] = {"prompt_tps": statistics.median(n_prompt / x["prefill_s"] for x in runs),
                        "decode_tps": statistics.median(args.new_tokens / x["decode_s"] for x in runs),
                        "rss": max(x["rss_mib"] for x in runs)}
    peer = rows[PEER]
    print(f"smollm2-135m + rank-{RANK} LoRA on q/k/v/up/down, batch 1, {n_prompt} prompt tokens, {args.new_tokens} "
          f"decoded, {args.threads} threads, median of {args.rounds} interleaved rounds (fresh process each)")
    print(f"{'engine':28s} {'prompt tok/s':>12s} {'x bf16':>7s} {'decode tok/s':>12s} {'x bf16':>7s} {'peak RSS MiB':>12s}")
    for engine, row in rows.items():
        print(f"{engine:28s} {row['prompt_tps']:12.1f} {row['prompt_tps'] / peer['prompt_tps']:7.2f} "
              f"{row['decode_tps']:12.1f} {row['decode_tps'] / peer['decode_tps']:7.2f} {row['rss']:12.0f}")
    fp32 = size(paths["fp32"])
    print(f"\n{'file':40s} {'MiB':>8s} {'vs fp32 folder':>15s}")
    for label, key in (("fp32 folder (safetensors)", "fp32"), ("bf16 folder (safetensors)", "bf16"),
                       ("GGUF f16 base", "f16.gguf"), ("GGUF Q4_0 base (qformat blocks)", "q4_0.gguf"),
                       ("PEFT adapter (fp32)", "peft"), ("GGUF LoRA adapter (f32)", "lora.gguf")):
        print(f"{label:40s} {size(paths[key]) / 2**20:8.1f} {size(paths[key]) / fp32:15.3f}")
    target = rows["llama.cpp Q4_0 + LoRA"]["decode_tps"] / peer["decode_tps"]
    print(f"\ntarget: llama.cpp Q4_0 + LoRA decode >= 3x transformers bf16 + PEFT: {target:.2f}x "
          f"({'met' if target >= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
