"""Exported tiny graphs and what the streamed passes' tests compare of two of them (nodes,
initializers, ONNX Runtime outputs): shared by tests/test_streamed_quantize.py and
tests/test_streamed_fp16.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from cwca_export.backends import get_backend
from helpers import tiny_model, tiny_tokenizer
from onnx import numpy_helper

from cwca_export.exporter import postprocess as pp
from cwca_export.exporter.session import make_session


def export_graphs(tmp_path_factory, specs: dict[str, tuple[str, str, bool, bool]]) -> dict[str, Path]:
    """name -> ``model.onnx`` of each (backend, family, tied, external) spec; external: every
    initializer of 1 KiB or more in a data file, as above 2 GiB."""
    made = {}
    for name, (backend, family, tied, external) in specs.items():
        folder = tmp_path_factory.mktemp(name)
        get_backend(backend).export(tiny_model(family, tie_word_embeddings=tied), tiny_tokenizer(), folder)
        made[name] = folder / "model.onnx"
        if external:
            pp.save_with_data(onnx.load(str(made[name])), folder / "external.onnx")
            made[name] = folder / "external.onnx"
    return made


def final_graph(src: Path, folder: Path) -> onnx.ModelProto:
    """The graph as the export writes it (``save_layout``: attribute tensors inline), with its data."""
    folder.mkdir()
    pp.save_layout(src, folder / "model.onnx", threshold=0)
    return onnx.load(str(folder / "model.onnx"))


def node_records(model: onnx.ModelProto, *, ordered: bool = False) -> list[tuple]:
    """Each node's op, name, inputs, outputs and attribute values; sorted unless ``ordered``."""
    def value(attribute):
        v = onnx.helper.get_attribute_value(attribute)
        return numpy_helper.to_array(v).tobytes() if isinstance(v, onnx.TensorProto) else repr(v)

    records = [(n.op_type, n.name, tuple(n.input), tuple(n.output), tuple((a.name, value(a)) for a in n.attribute))
               for n in model.graph.node]
    return records if ordered else sorted(records)


def run_graph(path: Path) -> list[np.ndarray]:
    """ONNX Runtime's outputs for two sequences of 7 tokens and an empty past (in the graph's float type)."""
    session = make_session(path)
    feeds = {}
    ids = np.random.default_rng(0).integers(0, 60, size=(2, 7))
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((2, 7), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(7), (2, 1))
        else:
            kind = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros([2 if k == 0 else 0 if k == 2 else d for k, d in enumerate(i.shape)], kind)
    return session.run(None, feeds)
