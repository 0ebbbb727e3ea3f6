"""Where llama.cpp's converter puts each row of a model's weights: run in a subprocess by shears.gguf_export.

    python shears/llama_cpp_rows.py CONVERTER_DIR MODEL_DIR SHAPES_JSON OUT_JSON

CONVERTER_DIR is llama.cpp's converter folder (convert_hf_to_gguf.py, conversion/, gguf-py/), MODEL_DIR an HF
model folder, SHAPES_JSON {weight name: [rows, cols]}. For each weight, a probe whose row i holds the number i
goes through the converter's own tensor layout (`filter_tensors`, then `modify_tensors` of the architecture's
model class: the q/k head permutation of Llama, splits, renames), so what comes out says which GGUF tensor
holds which of the weight's rows -- without shears restating any architecture's layout. OUT_JSON gets
{weight name: [[gguf name, [source row of each row] or null], ...]}; null means the converter changed the
weight some other way than choosing rows (then its quantized blocks cannot be carried over).

This file imports only llama.cpp's converter (its vendored gguf-py first, as its scripts do) and torch: it
runs outside shears, in the converter's folder, like convert_hf_to_gguf.py itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def block_id(name: str) -> int | None:
    """The converter's block id: the first number-like part of the tensor name."""
    return next((int(part) for part in name.split(".") if part.isdecimal()), None)


def main(converter: Path, model_dir: Path, shapes_file: Path, out_file: Path) -> None:
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(model_dir, False)
    model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    model = model_class(model_dir, gguf.LlamaFileType.ALL_F32, model_dir / "rows.gguf", eager=True, dry_run=True,
                        hparams=hparams)
    placed: dict[str, list] = {}
    with torch.inference_mode():
        for name, (rows, cols) in json.loads(shapes_file.read_text()).items():
            item = model.filter_tensors((name, lambda: None))
            if item is None:
                placed[name] = []
                continue
            # float32, as the converter hands weights to modify_tensors; row numbers are exact below 2**24
            probe = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols).contiguous()
            out = []
            for gguf_name, tensor in model.modify_tensors(probe, item[0], block_id(item[0])):
                chosen = (tensor.dim() == 2 and tensor.shape[1] == cols
                          and bool(torch.equal(tensor, tensor[:, :1].expand_as(tensor))))
                out.append([gguf_name, tensor[:, 0].long().tolist() if chosen else None])
            placed[name] = out
    out_file.write_text(json.dumps(placed))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:5]))
