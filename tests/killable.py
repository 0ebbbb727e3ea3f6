"""Run a shears CLI in this process and stop dead at one chosen point, for the test to SIGKILL it there.

    python tests/killable.py POINT READY_FILE MODULE [ARGS...]

POINT says where the process parks itself (it writes READY_FILE, then sleeps until killed):
  step:K    inside NLS optimizer step K (counted across rank_schedule stages), before its forward
  save:N    half-way through writing the N-th optimizer.pt of a Trainer checkpoint (a torn file)
  export:N  inside the N-th exported subnet's folder, after its weights and before its shears.json

Only the timing is arranged here; the kill itself is a real SIGKILL from outside, so nothing in the
process gets to clean up -- exactly what a crash, an OOM kill or a pre-empted node does.
"""

from __future__ import annotations

import importlib
import io
import sys
import time
from pathlib import Path


def park(ready_file: str, what: str) -> None:
    Path(ready_file).write_text(what)
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
    elif kind == "export":
        import shears.export as export

        write, count = export.write_adapter, [0]

        def parked_write(*args, **kwargs):
            write(*args, **kwargs)
            count[0] += 1
            if count[0] == target:
                park(ready_file, point)

        export.write_adapter = parked_write
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, ready, module, *argv = sys.argv[1:]
    arm(point, ready)
    importlib.import_module(module).main(argv)  # the module's own CLI, on the patched classes
