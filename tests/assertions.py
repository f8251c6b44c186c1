"""Checks the fold tests share: a BN that stays (and why).

Written once here, imported by tests/test_fold_grid.py and tests/test_fold_patterns.py.
"""

from __future__ import annotations

import onnx

import bnpass
from builders import BN_NODE_NAME


def assert_stays(model: onnx.ModelProto, *words: str, bn_name: str = BN_NODE_NAME) -> str:
    """The BN stays, its reason mentions each of ``words``, and the model is unchanged byte for byte.

    At least one word is required: a fixture refused for another reason than the one its test
    names would otherwise keep the test green while the check it guards is gone.
    """
    assert words, "name the words the reason must contain"
    original_bytes = model.SerializeToString()
    result = bnpass.fold_batchnorms(model)
    assert model.SerializeToString() == original_bytes, "fold_batchnorms mutated its input model"
    assert result.modified is False and result.folded == [], result.folded
    assert bn_name in result.skipped, result.skipped
    reason = result.skipped[bn_name]
    for word in words:
        assert word in reason, f"reason {reason!r} does not mention {word!r}"
    assert result.model.SerializeToString() == original_bytes, "model changed although nothing was folded"
    return reason
