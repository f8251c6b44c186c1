"""Calibration data the way pipelines have it: images, Python loaders, NNCF configs, dynamic
shapes, multi-input models, external data. References are numpy on the raw data."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from PIL import Image

import bnpass
from bnpass import arrays, images
from bnpass.cli import main
from bnpass.config import read_nncf_config
from bnpass.data import LABELS, model_input_specs
from bnpass.loaders import IterableSource
from bnpass.sources import open_folder
from builders import GraphBuilder, add_batchnorm, build_conv_bn_relu_chain_model, random_bn_params


def input_bn_model(shape, *, dtype=np.float32, channel_axis_last=False):
    """x -> (Transpose to NCHW when the input is NHWC) -> BN -> y: the BN sees the data itself."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", dtype, shape)
    source = "x"
    if channel_axis_last:
        builder.add_node("Transpose", ["x"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2])
        source = "nchw"
    channels = shape[3] if channel_axis_last else shape[1]
    add_batchnorm(builder, source, random_bn_params((channels,), np.random.default_rng(0), dtype))
    builder.add_output("y")
    return builder.build()


def pooled(data_nchw):
    data = np.asarray(data_nchw, dtype=np.float64)
    axes = (0,) + tuple(range(2, data.ndim))
    return data.mean(axis=axes), data.var(axis=axes)


def write_images(folder, count=5, size=(10, 12), mode="RGB", seed=0):
    """PNG files of random pixels; returns their pixel arrays (H, W[, C]) in file order."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for index in range(count):
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(pixels, mode).save(os.path.join(folder, f"img_{index:03d}.png"))
        arrays.append(pixels)
    return arrays


# --- images -----------------------------------------------------------------------------------

def test_images_are_center_cropped_scaled_and_normalized(tmp_path):
    pixels = write_images(tmp_path / "images", size=(10, 12))
    model = input_bn_model(["N", 3, 6, 8])
    options = bnpass.ImageOptions(resize=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))  # 10 = no resize
    result = bnpass.reestimate_batchnorms(model, tmp_path / "images", batch_size=2, image_options=options)
    crops = np.stack([p[2:8, 2:10] for p in pixels]).astype(np.float64) / 255.0  # center 6x8 of 10x12
    crops = (crops - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]
    mean, var = pooled(crops.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=1e-6)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=1e-6)


def test_images_bgr_nhwc_without_scaling(tmp_path):
    pixels = write_images(tmp_path / "images", size=(8, 8))
    model = input_bn_model(["N", 8, 8, 3], channel_axis_last=True)
    options = bnpass.ImageOptions(resize=8, color="bgr", scale=False)
    result = bnpass.reestimate_batchnorms(model, tmp_path / "images", batch_size=5, image_options=options)
    mean, var = pooled(np.stack(pixels)[..., ::-1].transpose(0, 3, 1, 2))
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=1e-6)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=1e-6)


def test_grayscale_model_reads_images_as_one_channel(tmp_path):
    pixels = write_images(tmp_path / "images", size=(16, 16), mode="L")
    model = input_bn_model(["N", 1, 16, 16])
    result = bnpass.reestimate_batchnorms(model, tmp_path / "images", batch_size=5,
                                          image_options=bnpass.ImageOptions(resize=16))
    mean, var = pooled(np.stack(pixels)[:, None] / 255.0)
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=1e-6)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=1e-6)


def test_images_are_resized_by_their_shorter_side_before_the_crop(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    # A horizontal ramp, value 5 * column, 20x40. Resizing the shorter side to 10 halves it
    # (10x20; a symmetric filter keeps a linear ramp linear: column j holds 5 * (2j + 0.5), which
    # Pillow rounds to the 8-bit 10j + 3), and
    # the center 10x10 crop keeps columns 5..14. Without the resize the crop would hold original
    # columns 15..24, with a quarter of the variance.
    ramp = np.tile((np.arange(40) * 5).astype(np.uint8), (20, 1))
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(folder / "a.png")
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(folder / "b.png")
    model = input_bn_model(["N", 3, 10, 10])
    result = bnpass.reestimate_batchnorms(model, folder, batch_size=2, image_options=bnpass.ImageOptions(resize=10))
    expected = (10 * np.arange(5, 15) + 3) / 255
    np.testing.assert_allclose(result.stats["bn"].mean, [expected.mean()] * 3, rtol=1e-3)
    np.testing.assert_allclose(result.stats["bn"].var, [expected.var()] * 3, rtol=1e-2)


# --- loaders, configs, shapes -------------------------------------------------------------------

def test_python_loader_of_samples_and_batches(tmp_path):
    data = np.random.default_rng(3).standard_normal((20, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "data.npy", data)
    (tmp_path / "loader.py").write_text(
        "import numpy as np, os\n"
        "def samples():\n"
        "    data = np.load(os.path.join(os.path.dirname(__file__), 'data.npy'))\n"
        "    yield from data[:7]\n"                       # samples, as arrays
        "    yield {'x': data[7:20]}\n")                  # then one batch, as a dict
    model = input_bn_model(["N", 3, 4, 4])
    onnx.save(model, tmp_path / "model.onnx")
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--loader",
                 f"{tmp_path / 'loader.py'}:samples", "--no-fold", "--batch-size", "8", "-q"]) == 0
    out = onnx.load(tmp_path / "out.onnx")
    mean = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "bn_mean")
    np.testing.assert_allclose(mean, pooled(data)[0], rtol=1e-6)


def test_nncf_config_with_comments_sets_the_sample_count(tmp_path):
    config = tmp_path / "nncf.json"
    config.write_text("""{
      // as NNCF users write it
      "input_info": {"sample_size": [1, 3, 4, 4]},
      "compression": [
        {"algorithm": "magnitude_sparsity", /* block comment */
         "initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 12}},
         "params": {"sparsity_target": 0.5, "url": "http://not/a/comment"},},
        {"algorithm": "quantization"},
      ],
    }""")
    settings = read_nncf_config(str(config))
    assert settings.num_samples == 12 and settings.sample_sizes == [[1, 3, 4, 4]]
    model = input_bn_model(["N", 3, 4, 4])
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.random.default_rng(0).standard_normal((40, 3, 4, 4)).astype(np.float32))
    report = tmp_path / "report.json"
    args = [str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "calib"),
            "--config", str(config), "--batch-size", "8", "--report", str(report), "-q"]
    assert main(args) == 0
    import json

    assert json.loads(report.read_text())["samples"] == 16  # 12 rounded up to whole batches of 8
    assert main(args + ["--num-samples", "30"]) == 0          # the flag wins
    assert json.loads(report.read_text())["samples"] == 32


def test_nncf_config_zero_samples_disables_reestimation(tmp_path, capsys):
    config = tmp_path / "nncf.json"
    config.write_text('{"compression": {"initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}}}')
    model = input_bn_model(["N", 3, 4, 4])
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.ones((40, 3, 4, 4), np.float32))
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "calib"),
                 "--config", str(config), "--no-fold"]) == 0
    assert "re-estimated" not in capsys.readouterr().out
    assert onnx.load(tmp_path / "out.onnx").SerializeToString() == model.SerializeToString()


def test_nncf_config_sample_size_must_fit_the_model(tmp_path, capsys):
    config = tmp_path / "nncf.json"
    config.write_text('{"input_info": [{"sample_size": [1, 3, 224, 224]}]}')
    onnx.save(input_bn_model(["N", 3, 4, 4]), tmp_path / "model.onnx")
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--fold-only",
                 "--config", str(config)]) == 1
    assert "sample_size [1, 3, 224, 224] does not fit model input 'x'" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_dynamic_spatial_sizes_are_batched_by_shape(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "calib"
    folder.mkdir()
    arrays = [rng.standard_normal((3, 4 + 2 * (i % 2), 5)).astype(np.float32) for i in range(9)]
    for index, array in enumerate(arrays):
        np.save(folder / f"{index:02d}.npy", array)
    model = input_bn_model(["N", 3, "H", "W"])
    result = bnpass.reestimate_batchnorms(model, folder, batch_size=4)
    assert result.batches == 9  # the size changes at every sample: each batch holds one
    values = np.concatenate([a.reshape(3, -1) for a in arrays], axis=1).astype(np.float64)
    np.testing.assert_allclose(result.stats["bn"].mean, values.mean(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.stats["bn"].var, values.var(1), rtol=1e-6)


def test_multi_input_model_from_npz_files(tmp_path):
    builder = GraphBuilder(opset=13)
    builder.add_input("a", np.float32, ["N", 3, 4])
    builder.add_input("b", np.float32, ["N", 3, 4])
    builder.add_node("Mul", ["a", "b"], ["ab"], name="mul")
    add_batchnorm(builder, "ab", random_bn_params((3,), np.random.default_rng(0)))
    builder.add_output("y")
    model = builder.build()
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((10, 3, 4)).astype(np.float32), rng.standard_normal((10, 3, 4)).astype(np.float32)
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "part1.npz", a=a[:6], b=b[:6])
    np.savez(tmp_path / "calib" / "part2.npz", a=a[6:], b=b[6:])
    result = bnpass.reestimate_batchnorms(model, tmp_path / "calib", batch_size=4)
    mean, var = pooled(a.astype(np.float64) * b)
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=1e-5)


def test_model_with_external_data_is_written_with_external_data(tmp_path):
    model = input_bn_model(["N", 300, 2, 2])  # 300 float32 parameters: 1200 bytes, above onnx's 1 KiB threshold
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.random.default_rng(0).standard_normal((8, 300, 2, 2)).astype(np.float32))
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "calib"),
                 "--batch-size", "8", "--no-fold", "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["calib", "model.onnx", "model.onnx.data", "out.onnx", "out.onnx.data"]
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path, monkeypatch):
    """The >2 GiB path, with the limit lowered so a small model takes it."""
    from bnpass import model_io

    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100)
    model = input_bn_model(["N", 300, 2, 2])
    before = model.SerializeToString()
    model_io.save_model(model, tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    assert model.SerializeToString() == before  # saving does not move the caller's tensors out
    loaded = model_io.load_model(tmp_path / "out.onnx")
    for saved, original in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(saved), onnx.numpy_helper.to_array(original))


def test_a_model_protobuf_cannot_count_is_over_the_limit(monkeypatch):
    """Regression: past 2 GiB, upb's ByteSize() raises EncodeError instead of counting, so saving a
    folded >2 GiB model failed (measured with tools/measure_onnx_ir.py on a 2.3 GiB model)."""
    import google.protobuf.message

    from bnpass import model_io

    class TooLarge:  # a ModelProto as upb shows one over 2 GiB: payloads known, ByteSize() raising
        graph = input_bn_model(["N", 300, 2, 2]).graph

        def ByteSize(self):
            raise google.protobuf.message.EncodeError("Failed to serialize proto")

    payload = sum(t.ByteSize() for t in TooLarge.graph.initializer)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", payload + 10)  # near the limit: ByteSize() is asked
    assert model_io.exceeds_protobuf_limit(TooLarge())


def test_a_model_failing_the_checker_is_never_written(tmp_path):
    from bnpass import model_io

    model = input_bn_model(["N", 3, 4, 4])
    model.graph.node[0].input[0] = "undefined"
    with pytest.raises(onnx.checker.ValidationError):
        model_io.save_model(model, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_models_over_the_protobuf_limit_calibrate_from_files(monkeypatch):
    """onnxruntime gets a >2 GiB model from files (limit lowered so a small model takes the path)."""
    from bnpass import model_io

    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100)
    model = input_bn_model(["N", 300, 2, 2])
    data = np.random.default_rng(4).standard_normal((16, 300, 2, 2)).astype(np.float32)
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=8)
    np.testing.assert_allclose(result.stats["bn"].mean, pooled(data)[0], rtol=1e-6, atol=1e-7)
    assert model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # the input is untouched


def test_batch_files_stream_in_chunks_across_batch_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(arrays, "READ_CHUNK", 7)  # chunks of 7 samples, batches of 5
    data = np.random.default_rng(8).standard_normal((40, 3, 4, 4)).astype(np.float64)  # cast to float32 per chunk
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", data[:23])
    np.save(tmp_path / "calib" / "b.npy", data[23:])
    result = bnpass.reestimate_batchnorms(input_bn_model(["N", 3, 4, 4]), tmp_path / "calib", batch_size=5,
                                          stats="batch-mean")
    assert result.samples == 40 and result.batches == 8
    batches = data.astype(np.float32).astype(np.float64).reshape(8, 5, 3, 4, 4)
    expected = np.mean([b.var(axis=(0, 2, 3), ddof=1) for b in batches], axis=0)
    np.testing.assert_allclose(result.stats["bn"].var, expected, rtol=1e-6)


# --- what a new user hit (issue 8) ---------------------------------------------------------------

def test_loader_of_pytorch_style_tuples_and_a_calibration_data_reader(tmp_path):
    """A DataLoader yields (inputs, labels); onnxruntime's quantization users have readers."""
    data = np.random.default_rng(3).standard_normal((20, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "data.npy", data)
    (tmp_path / "loaders.py").write_text(
        "import numpy as np, os, torch\n"
        "from onnxruntime.quantization import CalibrationDataReader\n"
        "data = np.load(os.path.join(os.path.dirname(__file__), 'data.npy'))\n"
        "def dataloader():\n"
        "    dataset = torch.utils.data.TensorDataset(torch.from_numpy(data), torch.arange(20))\n"
        "    return torch.utils.data.DataLoader(dataset, batch_size=6)\n"
        "def tuples_of_samples():\n"
        "    return [(sample, 0) for sample in data]\n"
        "class Reader(CalibrationDataReader):\n"
        "    def __init__(self):\n"
        "        self.batches = iter([{'x': data[:11]}, {'x': data[11:]}])\n"
        "    def get_next(self):\n"
        "        return next(self.batches, None)\n"
        "def reader():\n"
        "    return Reader()\n")
    model = input_bn_model(["N", 3, 4, 4])
    onnx.save(model, tmp_path / "model.onnx")
    for function in ("dataloader", "tuples_of_samples", "reader"):
        assert main([str(tmp_path / "model.onnx"), str(tmp_path / f"{function}.onnx"), "--loader",
                     f"{tmp_path / 'loaders.py'}:{function}", "--no-fold", "--batch-size", "8", "-q"]) == 0
        out = onnx.load(tmp_path / f"{function}.onnx")
        mean = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "bn_mean")
        np.testing.assert_allclose(mean, pooled(data)[0], rtol=1e-6, err_msg=function)


def test_api_takes_a_calibration_data_reader_and_a_model_path(tmp_path):
    class Reader:
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    data = np.random.default_rng(4).standard_normal((12, 3, 4, 4)).astype(np.float32)
    onnx.save(input_bn_model(["N", 3, 4, 4]), tmp_path / "model.onnx")
    result = bnpass.reestimate_batchnorms(str(tmp_path / "model.onnx"), Reader([{"x": data[:5]}, {"x": data[5:]}]),
                                          batch_size=4)
    np.testing.assert_allclose(result.stats["bn"].mean, pooled(data)[0], rtol=1e-6, atol=1e-7)
    assert bnpass.fold_batchnorms(tmp_path / "model.onnx").skipped  # a path works for folding too
    with pytest.raises(bnpass.ModelError, match="expected an onnx.ModelProto or the path of an .onnx file, not int"):
        bnpass.fold_batchnorms(7)


def test_class_subfolders_are_read_recursively_with_tiff_files(tmp_path, caplog):
    """calib/<class>/*: every file of every subfolder, in sorted order, hidden ones skipped."""
    cats = write_images(tmp_path / "calib" / "cat", count=3, size=(6, 8), seed=1)
    dogs = write_images(tmp_path / "calib" / "dog", count=2, size=(6, 8), seed=2)
    for index, pixels in enumerate(dogs):  # the dogs as TIFF files
        Image.fromarray(pixels).save(tmp_path / "calib" / "dog" / f"img_{index:03d}.tif")
        os.remove(tmp_path / "calib" / "dog" / f"img_{index:03d}.png")
    write_images(tmp_path / "calib" / ".cache", count=1, size=(6, 8), seed=3)  # hidden: skipped
    model = input_bn_model(["N", 3, 6, 8])
    source = bnpass.calibration_samples(model, tmp_path / "calib", bnpass.ImageOptions(resize=6))
    assert [os.path.relpath(f, tmp_path / "calib") for f in source.files] == [
        os.path.join("cat", "img_000.png"), os.path.join("cat", "img_001.png"), os.path.join("cat", "img_002.png"),
        os.path.join("dog", "img_000.tif"), os.path.join("dog", "img_001.tif")]
    with caplog.at_level("INFO", logger="bnpass"):
        result = bnpass.reestimate_batchnorms(model, tmp_path / "calib", batch_size=5,
                                              image_options=bnpass.ImageOptions(resize=6))
    mean, var = pooled(np.stack(cats + dogs).transpose(0, 3, 1, 2) / 255.0)
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=1e-6)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=1e-6)
    assert "5 samples in 5 files from 2 folders" in caplog.text
    assert "the samples come folder by folder (2 folders, in order)" in caplog.text and "add --shuffle" in caplog.text


def test_single_input_npz_may_name_its_array_arr_0(tmp_path):
    data = np.random.default_rng(5).standard_normal((9, 3, 4, 4)).astype(np.float32)
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "a.npz", data)  # positional: saved as arr_0
    result = bnpass.reestimate_batchnorms(input_bn_model(["N", 3, 4, 4]), tmp_path / "calib", batch_size=9)
    np.testing.assert_allclose(result.stats["bn"].mean, pooled(data)[0], rtol=1e-6, atol=1e-7)


def test_npz_labels_travel_with_their_samples_and_are_checked(tmp_path):
    """A 'labels' array beside the inputs: one class index per sample, with its sample however read (arr_0
    beside it, shuffled); in every file or in none."""
    data = np.random.default_rng(6).standard_normal((9, 3, 4, 4)).astype(np.float32)
    specs = model_input_specs(input_bn_model(["N", 3, 4, 4]))
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "a.npz", data[:5], labels=np.arange(5))  # positional: arr_0
    np.savez(tmp_path / "calib" / "b.npz", x=data[5:], labels=np.arange(5, 9))
    for shuffle in (False, True):
        samples = list(open_folder(tmp_path / "calib", specs, shuffle=shuffle, seed=1))
        assert sorted(int(sample[LABELS]) for sample in samples) == list(range(9))
        for sample in samples:
            np.testing.assert_array_equal(sample["x"], data[int(sample[LABELS])])
    np.savez(tmp_path / "calib" / "b.npz", x=data[5:])
    with pytest.raises(bnpass.DataError, match="a.npz has a 'labels' array and .*b.npz has none"):
        open_folder(tmp_path / "calib", specs)
    np.savez(tmp_path / "calib" / "b.npz", x=data[5:], labels=np.array([0.5, 1, 2, 3]))
    with pytest.raises(bnpass.DataError, match=r"b.npz: 'labels' must hold one class index per sample \(4\)"):
        open_folder(tmp_path / "calib", specs)


def test_pickled_object_arrays_are_refused_by_name(tmp_path):
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "a.npz", x=np.array([np.zeros((3, 4, 4)), None], dtype=object))
    with pytest.raises(bnpass.DataError, match=r"a.npz: array 'x' holds Python objects \(dtype object\)"):
        bnpass.reestimate_batchnorms(input_bn_model(["N", 3, 4, 4]), tmp_path / "calib")
    ragged = np.empty(2, dtype=object)  # what a list of arrays of different shapes becomes
    ragged[0], ragged[1] = np.zeros((3, 4, 4)), np.zeros((3, 4, 5))
    with pytest.raises(bnpass.DataError, match=r"batch 0: holds Python objects \(dtype object\)"):
        bnpass.reestimate_batchnorms(input_bn_model(["N", 3, 4, 4]), [ragged])


def test_sixteen_bit_grayscale_images_keep_their_sixteen_bits(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 65536, (8, 8), dtype=np.uint16) for _ in range(3)]
    for index, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{index}.png")
    stacked = np.stack(images).astype(np.float64) / 65535.0
    gray = bnpass.reestimate_batchnorms(input_bn_model(["N", 1, 8, 8]), folder, batch_size=3,
                                        image_options=bnpass.ImageOptions(resize=8))
    mean, var = pooled(stacked[:, None])
    np.testing.assert_allclose(gray.stats["bn"].mean, mean, rtol=1e-6)
    np.testing.assert_allclose(gray.stats["bn"].var, var, rtol=1e-6)
    rgb = bnpass.reestimate_batchnorms(input_bn_model(["N", 3, 8, 8]), folder, batch_size=3,
                                       image_options=bnpass.ImageOptions(resize=8))  # gray fills 3 channels
    np.testing.assert_allclose(rgb.stats["bn"].mean, [mean[0]] * 3, rtol=1e-6)


def _sample_ids(source) -> list:
    """The id each sample carries (every value of sample i is i)."""
    return [int(next(iter(sample.values())).reshape(-1)[0]) for sample in source]


@pytest.mark.parametrize("layout", ["sample files", "batch files", "batch npz files", "images"])
def test_shuffle_is_a_seeded_permutation_of_every_sample(tmp_path, layout):
    folder = tmp_path / "calib"
    folder.mkdir()
    ids = np.arange(24, dtype=np.float32)
    if layout == "images":
        for i in range(24):
            Image.fromarray(np.full((4, 4), i, np.uint8)).save(folder / f"{i:02d}.png")
        model, options = input_bn_model(["N", 1, 4, 4]), bnpass.ImageOptions(resize=4, scale=False)
    else:
        samples = np.broadcast_to(ids[:, None, None, None], (24, 3, 4, 4)).copy()
        model, options = input_bn_model(["N", 3, 4, 4]), None
        for start in range(0, 24, 1 if layout == "sample files" else 8):
            chunk = samples[start] if layout == "sample files" else samples[start:start + 8]
            if layout == "batch npz files":
                np.savez(folder / f"{start:02d}.npz", x=chunk)
            else:
                np.save(folder / f"{start:02d}.npy", chunk)
    in_order = _sample_ids(bnpass.calibration_samples(model, folder, options))
    first = _sample_ids(bnpass.calibration_samples(model, folder, options, shuffle=True, seed=1))
    again = _sample_ids(bnpass.calibration_samples(model, folder, options, shuffle=True, seed=1))
    other = _sample_ids(bnpass.calibration_samples(model, folder, options, shuffle=True, seed=2))
    assert in_order == list(range(24))
    assert sorted(first) == list(range(24)) and sorted(other) == list(range(24))  # each sample once
    assert first == again and first != other and first != in_order
    if layout == "batch npz files":  # read whole by numpy: files shuffled, then the samples within each
        assert all(len({sample // 8 for sample in first[i:i + 8]}) == 1 for i in range(0, 24, 8))
    else:  # one permutation: the first 8 come from more than one file of 8
        assert len({sample // 8 for sample in first[:8]}) > 1


def test_jpeg_over_pillows_decompression_bomb_limit_is_read_at_a_reduced_scale(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    folder = tmp_path / "images"
    folder.mkdir()
    ramp = np.tile(np.linspace(0, 255, 64), (64, 1)).astype(np.uint8)
    PILImage.fromarray(ramp).save(folder / "scan.jpg", quality=95)
    model = input_bn_model(["N", 1, 8, 8])
    full = bnpass.reestimate_batchnorms(model, folder, batch_size=1, image_options=bnpass.ImageOptions(resize=8))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: Pillow refuses
    with pytest.raises(PILImage.DecompressionBombError):
        PILImage.open(folder / "scan.jpg")
    with images._open_image(str(folder / "scan.jpg"), target=8) as image:
        assert image.size == (8, 8)  # libjpeg decodes at 1/8 scale: 64 pixels, not 4096
    reduced = bnpass.reestimate_batchnorms(model, folder, batch_size=1, image_options=bnpass.ImageOptions(resize=8))
    np.testing.assert_allclose(reduced.stats["bn"].mean, full.stats["bn"].mean, rtol=0.02)  # decoded at 1/8 scale
    os.remove(folder / "scan.jpg")
    PILImage.fromarray(ramp).save(folder / "scan.png")  # the same pixels as PNG: no safe reduced read
    with pytest.raises(bnpass.DataError, match=r"scan.png: too large to read safely \(Image size \(4096 pixels\)"):
        bnpass.reestimate_batchnorms(model, folder, image_options=bnpass.ImageOptions(resize=8))


def test_cli_keeps_pillows_large_image_warning_off_the_terminal(tmp_path, monkeypatch, recwarn):
    from PIL import Image as PILImage

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        PILImage.fromarray(np.full((40, 40), 9 * index, np.uint8)).save(folder / f"{index}.png")
    onnx.save(input_bn_model(["N", 1, 8, 8]), tmp_path / "model.onnx")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over the limit, under twice it
    with pytest.warns(PILImage.DecompressionBombWarning):
        PILImage.open(folder / "0.png")
    recwarn.clear()
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(folder), "--batch-size",
                 "2", "-q"]) == 0
    assert not [w for w in recwarn if issubclass(w.category, PILImage.DecompressionBombWarning)]


def test_nncf_config_with_zero_samples_folds_without_data(tmp_path, capsys):
    config = tmp_path / "nncf.json"
    config.write_text('{"compression": {"initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}}}')
    onnx.save(input_bn_model(["N", 3, 4, 4]), tmp_path / "model.onnx")
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--config", str(config)]) == 0
    assert "re-estimated" not in capsys.readouterr().out
    assert (tmp_path / "out.onnx").exists()


def test_api_cuda_error_names_the_api_argument_not_the_cli_flag():
    from bnpass.runtime import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("this machine has a working CUDA provider")
    data = np.zeros((4, 3, 4, 4), np.float32)
    with pytest.raises(bnpass.RuntimeUnavailableError) as raised:
        bnpass.reestimate_batchnorms(input_bn_model(["N", 3, 4, 4]), [data], device="cuda")
    assert str(raised.value).startswith("device='cuda': ") and "--device" not in str(raised.value)


def test_api_image_options_for_arrays_are_an_error(tmp_path):
    model = build_conv_bn_relu_chain_model()
    np.save(tmp_path / "a.npy", np.zeros((4, 4, 6, 6), np.float32))
    options = bnpass.ImageOptions(mean=(0.5,), std=(0.2,))
    for data in (tmp_path / "a.npy", [np.zeros((4, 4, 6, 6), np.float32)]):
        with pytest.raises(bnpass.DataError, match=r"\(--mean, --std\)|--mean, --std apply"):
            bnpass.calibration_samples(model, data, options)


def test_python_objects_are_refused_in_one_sentence():
    """The same sentence wherever data hold Python objects (bnpass.data.python_objects_error), down to the fix."""
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((3, 4, 4)), np.zeros((3, 4, 5))
    with pytest.raises(bnpass.DataError) as refused:
        list(IterableSource([ragged], model_input_specs(input_bn_model(["N", 3, 4, 4]))))
    assert str(refused.value) == ("batch 0: holds Python objects (dtype object), not numbers; bnpass never unpickles "
                                  "data: save a numeric array")
