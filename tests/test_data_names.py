"""The names arrays come under (issue 22, item 15): ``--data examples/digits/test.npz``, the project's own
labelled set, was refused because its arrays are named ``images``/``labels``. A single-input model's
samples may come as the input's name, ``arr_0``, ``x``, ``images``, ``inputs``, ``input`` or ``data``;
labels as ``labels``, ``y``, ``targets``, ``label`` or ``target``; else the error says what to rename."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnpass
from bnpass.arrays import ArrayFolder
from bnpass.cli import main
from bnpass.data import LABELS, model_input_specs
from bnpass.loaders import IterableSource
from bnpass.sources import open_folder

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits"
INPUT_NAMES = ("x", "images", "inputs", "input", "data")  # what issue 22 asked for, beside the input's own name
LABEL_NAMES = ("labels", "y", "targets", "label", "target")
SPECS = model_input_specs(onnx.load(EXAMPLE / "model_compressed.onnx"))  # one input, 'input' float32[?, 1, 8, 8]


def digits(count=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, count)


def test_the_projects_own_labelled_test_set_is_calibration_data(tmp_path, capsys):
    assert main([str(EXAMPLE / "model_compressed.onnx"), str(tmp_path / "out.onnx"), "--data",
                 str(EXAMPLE / "test.npz"), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "from 500 samples" in capsys.readouterr().out
    with np.load(EXAMPLE / "test.npz") as archive:
        images, labels = archive["images"], archive["labels"]
    samples = list(open_folder(EXAMPLE / "test.npz", SPECS))
    np.testing.assert_array_equal(np.stack([sample["input"] for sample in samples]), images)
    np.testing.assert_array_equal([int(sample[LABELS]) for sample in samples], labels)


@pytest.mark.parametrize("inputs", ["input", "arr_0", *INPUT_NAMES])
@pytest.mark.parametrize("labels", LABEL_NAMES)
def test_every_accepted_name_gives_the_same_samples_and_labels(tmp_path, inputs, labels):
    images, classes = digits()
    np.savez(tmp_path / "a.npz", **{inputs: images, labels: classes})
    samples = list(ArrayFolder(str(tmp_path), [str(tmp_path / "a.npz")], SPECS))
    np.testing.assert_array_equal(np.stack([sample["input"] for sample in samples]), images)
    np.testing.assert_array_equal([int(sample[LABELS]) for sample in samples], classes)


def test_other_names_are_an_error_saying_what_to_rename(tmp_path):
    images, classes = digits()
    np.savez(tmp_path / "a.npz", pixels=images, labels=classes)
    with pytest.raises(bnpass.DataError) as raised:
        open_folder(tmp_path / "a.npz", SPECS)
    assert str(raised.value) == (
        f"{tmp_path / 'a.npz'}: no array for model input 'input' (the file has: pixels, labels); rename 'pixels' to "
        "'input' (accepted: 'input', arr_0, x, images, inputs, input, data; labels: labels, y, targets, label, target)")
    np.savez(tmp_path / "a.npz", x=images, images=images)
    with pytest.raises(bnpass.DataError, match="arrays 'x' and 'images' could each be model input 'input': rename the "
                                               "one to use to 'input'"):
        open_folder(tmp_path / "a.npz", SPECS)


def test_targets_that_are_not_class_indices_are_left_out_under_an_alias_and_refused_as_labels(tmp_path, caplog):
    images, _ = digits()
    masks = np.zeros((12, 8, 8), np.float32)
    np.savez(tmp_path / "a.npz", x=images, y=masks)
    with caplog.at_level(logging.INFO, logger="bnpass"):
        samples = list(open_folder(tmp_path / "a.npz", SPECS))
    assert len(samples) == 12 and not any(LABELS in sample for sample in samples)
    assert "'y' (float32 of shape [12, 8, 8]) is not one class index per sample: not used as labels" in caplog.text
    np.savez(tmp_path / "a.npz", x=images, labels=masks)
    with pytest.raises(bnpass.DataError, match=r"'labels' must hold one class index per sample \(12\)"):
        open_folder(tmp_path / "a.npz", SPECS)


def test_a_loaders_dict_batches_take_the_same_names(tmp_path):
    images, classes = digits()
    samples = list(IterableSource([{"images": images[:6], "labels": classes[:6]},
                                   {"images": images[6:], "labels": classes[6:]}], SPECS))
    np.testing.assert_array_equal(np.stack([sample["input"] for sample in samples]), images)
    np.testing.assert_array_equal([int(sample[LABELS]) for sample in samples], classes)
    with pytest.raises(bnpass.DataError, match=r"batch 0: no array for model input 'input' \(the batch has: image\); "
                                               "rename 'image' to 'input'"):
        list(IterableSource([{"image": images}], SPECS))


def test_loader_labels_follow_the_one_labels_rule():
    """(inputs, labels) items: labels are whole numbers (bnpass.data.are_class_indices), so float 3.0 is class 3;
    0.5 and inf (which rounds to itself) are no class indices, and such targets are left out, not refused."""
    images, classes = digits(count=4)
    samples = list(IterableSource([(images, classes.astype(np.float32))], SPECS))
    assert [int(sample[LABELS]) for sample in samples] == classes.tolist()
    for targets in ([0.5, 1.0, 2.0, 3.0], [np.inf, 1.0, 2.0, 3.0], [-np.inf, 1.0, 2.0, 3.0]):
        samples = list(IterableSource([(images, np.array(targets))], SPECS))
        assert len(samples) == 4 and not any(LABELS in sample for sample in samples), targets
