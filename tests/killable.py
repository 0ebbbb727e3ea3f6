"""Run a shears CLI in this process and stop dead at one chosen point, for the test to SIGKILL it there.

    python tests/killable.py POINT READY_FILE MODULE [ARGS...]

POINT says where the process parks itself (it writes READY_FILE, then sleeps until killed):
  step:K    inside NLS optimizer step K (counted across rank_schedule stages), before its forward
  save:N    half-way through writing the N-th optimizer.pt of a Trainer checkpoint (a torn file)
  export:N  inside the N-th exported subnet's folder, after its weights and before its shears.json
  eval:N    inside the N-th subnet evaluation of a search, before its result is recorded
  gguf:N    inside a GGUF export, just after the N-th subnet's adapter.gguf is written

Only the timing is arranged here; the kill itself is a real SIGKILL from outside (`kill_at`, the
tests' side), so nothing in the process gets to clean up -- exactly what a crash, an OOM kill or a
pre-empted node does.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One thread per process: the machine's cores are shared by every process a test starts.
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def kill_at(point: str, module: str, *args: str, tmp_path: Path, timeout: float = 600,
            before_kill=None) -> str:
    """Run `python -m module args` until it parks at `point`, call `before_kill()` if given, SIGKILL it,
    and return what it parked on."""
    import pytest

    ready = tmp_path / f"parked-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, __file__, point, str(ready), module, *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists() or not ready.read_text():
            if proc.poll() is not None:
                pytest.fail(f"{module} ended (rc {proc.returncode}) before {point}:\n{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{module} did not reach {point} in {timeout}s")
            time.sleep(0.05)
        if before_kill is not None:
            before_kill()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
        return ready.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def park(ready_file: str, what: str) -> None:
    tmp = Path(f"{ready_file}.tmp")
    tmp.write_text(what)
    os.replace(tmp, ready_file)  # whole or absent: the test reads it the moment it appears
    while True:
        time.sleep(60)


def arm(point: str, ready_file: str) -> None:
    kind, _, n = point.partition(":")
    target = int(n)
    if kind == "step":
        import shears.train_supernet as ts

        step = ts.NLSTrainer.training_step

        def parked_step(self, *args, **kwargs):
            if self.step_offset + self.state.global_step == target:
                park(ready_file, point)
            return step(self, *args, **kwargs)

        ts.NLSTrainer.training_step = parked_step
    elif kind == "save":
        import torch

        save, count = torch.save, [0]

        def torn_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, Path)) and str(f).endswith("optimizer.pt"):
                count[0] += 1
                if count[0] == target:
                    buffer = io.BytesIO()
                    save(obj, buffer, *args, **kwargs)
                    data = buffer.getvalue()
                    with open(f, "wb") as handle:
                        handle.write(data[: len(data) // 2])
                    park(ready_file, point)
            return save(obj, f, *args, **kwargs)

        torch.save = torn_save
    elif kind in ("export", "gguf"):  # just after the N-th call of the function that writes a subnet's weights
        import shears.export
        import shears.gguf_export

        owner, name = {"export": (shears.export, "write_subnet_adapter"),
                       "gguf": (shears.gguf_export, "convert_adapter")}[kind]
        write, count = getattr(owner, name), [0]

        def parked_write(*args, **kwargs):
            write(*args, **kwargs)
            count[0] += 1
            if count[0] == target:
                park(ready_file, point)

        setattr(owner, name, parked_write)
    elif kind == "eval":
        from shears.search.problem import SearchProblem

        measure, count = SearchProblem.measure, [0]

        def parked_measure(self, config, *args, **kwargs):
            count[0] += 1
            if count[0] == target:
                park(ready_file, json.dumps({"pid": os.getpid(),
                                             "config": json.dumps(config, sort_keys=True, separators=(",", ":"))}))
            return measure(self, config, *args, **kwargs)

        SearchProblem.measure = parked_measure
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, ready, module, *argv = sys.argv[1:]
    arm(point, ready)
    importlib.import_module(module).main(argv)  # the module's own CLI, on the patched classes
