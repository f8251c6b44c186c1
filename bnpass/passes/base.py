"""The pass contract: ``call(model) -> PassResult``.

A pass never mutates the model it is given; it returns a new one and says whether anything
changed (``modified`` is exact: running a pass on its own output reports False).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
