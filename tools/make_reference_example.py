"""Build and measure the ``--reference`` showcase: where matching the uncompressed model helps, and where not.

``--reference`` (issue 10) gives each BN of the compressed model the statistics that make it
reproduce the uncompressed model's per-channel BN outputs on the calibration data, instead of the
unit normal that plain re-estimation gives. The two coincide when the calibration data look like
the training data; they part when they do not. This script shows three deployments of one model:

- ``in-domain``: calibration and test images from the training distribution (all ten digits).
  Expected: a tie.
- ``classes-0-4``: the deployment only ever sees the digits 0-4 (a camera that sees some classes
  only). The uncompressed model is as accurate there as anywhere, but the class mix moves the
  mean of every class-discriminating channel. Re-estimation centres those channels again on the
  skewed data, removing what the next layers discriminate on (it costs even the *uncompressed*
  model accuracy); matching keeps the uncompressed model's offsets. Expected: matching wins.
- ``shifted``: lower contrast and noise (``0.5 x + 0.25 + N(0, 0.1)``), a domain the uncompressed
  model handles poorly. Re-estimation adapts every BN to the new domain (AdaBN) and beats even the
  uncompressed model; matching faithfully reproduces the uncompressed model's weakness. Expected:
  matching loses, and agreement with the uncompressed model, the label-free signal ``--reference``
  chooses by, can pick the wrong candidate here (it measures closeness to the reference, and the
  reference is the weaker model on this data).

The model: a deeper, wider CNN than ``examples/digits`` (six BNs, a residual block, a depthwise
layer, a BatchNorm1d), trained on scikit-learn's bundled 8x8 digits (no download) without
augmentation, exported with BN kept. Compression after export: magnitude pruning of every layer
but the first and the last (BN untouched), 70% for the shipped ``model_compressed.onnx``; 50%
pruning and 4-bit per-tensor weights are measured too.

Per deployment and compression the script measures test accuracy of the uncompressed, compressed,
re-estimated (bnpass itself, pooled statistics) and matched models, each candidate's top-1
agreement with the uncompressed model on the calibration images, and what ``--reference`` keeps
(bnpass's own choice, on every calibration image; the README's tables measure the candidates
bnpass writes). The matched model's accuracy comes from the independent level-by-level PyTorch
reference in ``tests/matching_reference.py``.

Files written (``--output-dir``, default ``examples/reference``), about 0.8 MB::

    model.onnx, model_compressed.onnx
    <deployment>/calib/calib_000.npy ...   384 unlabelled calibration images, batches of 64
    <deployment>/test.npz                  labelled test images (images, labels)

Usage (from the repository root; needs PyTorch and scikit-learn)::

    python tools/make_reference_example.py [--seed 0] [--output-dir examples/reference]
    python tools/make_reference_example.py --sweep 5     # measure seeds 0-4, write nothing
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from torch import nn

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT / "tests"))
sys.path.insert(0, str(REPOSITORY_ROOT))

import bnpass  # noqa: E402
from bnpass.agreement import AgreementMeter  # noqa: E402
from builders import export_with_batchnorm_kept, run_onnxruntime  # noqa: E402
from make_example import write_calibration_batches  # noqa: E402
from matching_reference import batchnorms, fake_quantize, magnitude_prune, match_level_by_level  # noqa: E402

DEFAULT_OUTPUT_DIR = REPOSITORY_ROOT / "examples" / "reference"
TEST_SIZE = 500
CALIBRATION_SIZE = 384
BATCH_SIZE = 64
SHIPPED_COMPRESSION = "prune70"
COMPRESSIONS = {
    "prune50": lambda model: magnitude_prune(model, 0.5),
    "prune70": lambda model: magnitude_prune(model, 0.7),
    "int4": lambda model: fake_quantize(model, bits=4),
}


class DeeperDigitsNet(nn.Module):
    """conv 1->32 -> BN -> ReLU -> residual block (conv-BN-ReLU-conv-BN, + input) -> ReLU -> pool
    -> depthwise 3x3 -> BN -> ReLU -> conv 1x1 32->64 -> BN -> ReLU -> pool -> Linear 256->64 ->
    BatchNorm1d -> ReLU -> Linear 64->10. Six BNs, about 39k parameters."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.depthwise, self.bn4 = nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width)
        self.pointwise, self.bn5 = nn.Conv2d(width, 2 * width, 1), nn.BatchNorm2d(2 * width)
        self.fc, self.bn6 = nn.Linear(2 * width * 4, 64), nn.BatchNorm1d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x))))))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.bn4(self.depthwise(x)))
        x = torch.relu(self.bn5(self.pointwise(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.head(torch.relu(self.bn6(self.fc(x))))


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help="folder for the models and the deployments' data (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default: 0)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    parser.add_argument("--sweep", type=int, metavar="K",
                        help="measure seeds 0..K-1 and print the medians; writes nothing")
    return parser.parse_args(argv)


def train(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int) -> DeeperDigitsNet:
    """Adam, cross-entropy, batches of 64, no augmentation."""
    torch.manual_seed(seed)
    model = DeeperDigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    shuffler = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=shuffler)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def deployments(seed: int) -> tuple:
    """The training set and, per deployment, (calibration images, test images, test labels)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, np.newaxis]
    labels = digits.target.astype(np.int64)
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(images))
    test, train_part = order[:TEST_SIZE], order[TEST_SIZE:]
    calibration = generator.permutation(train_part)   # unlabelled, drawn from the training part
    low = calibration[labels[calibration] < 5]
    shift = np.random.default_rng(seed + 1000)

    def shifted(batch):
        return (0.5 * batch + 0.25 + 0.1 * shift.standard_normal(batch.shape)).astype(np.float32)

    test_low = test[labels[test] < 5]
    return (images[train_part], labels[train_part]), {
        "in-domain": (images[calibration[:CALIBRATION_SIZE]], images[test], labels[test]),
        "classes-0-4": (images[low[:CALIBRATION_SIZE]], images[test_low], labels[test_low]),
        "shifted": (shifted(images[calibration[:CALIBRATION_SIZE]]), shifted(images[test]), labels[test]),
    }


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    return run_onnxruntime(model, {"input": images})[0]


def measure(model: DeeperDigitsNet, compressed: DeeperDigitsNet, calibration: np.ndarray,
            test_images: np.ndarray, test_labels: np.ndarray) -> dict:
    """Accuracies and agreements of the compressed, re-estimated and matched models, and what --reference keeps."""
    sample = torch.from_numpy(calibration[:2])
    uncompressed_onnx = export_with_batchnorm_kept(model, sample)
    compressed_onnx = export_with_batchnorm_kept(compressed, sample)
    batches = [calibration[i:i + BATCH_SIZE] for i in range(0, len(calibration), BATCH_SIZE)]
    reestimated_onnx = bnpass.reestimate_batchnorms(compressed_onnx, batches, batch_size=BATCH_SIZE,
                                                    num_samples=len(calibration), device="cpu").model
    levels = [[name] for name in batchnorms(model)]   # one BN per level: graph order is topological
    matched, _ = match_level_by_level(model, compressed, torch.from_numpy(calibration), levels)
    matched_onnx = export_with_batchnorm_kept(matched, sample)
    reference_logits = logits(uncompressed_onnx, calibration)
    row = {"uncompressed": _accuracy(uncompressed_onnx, test_images, test_labels)}
    for name, candidate in (("compressed", compressed_onnx), ("reestimated", reestimated_onnx),
                            ("matched", matched_onnx)):
        row[name] = _accuracy(candidate, test_images, test_labels)
        meter = AgreementMeter(["logits"])
        meter.add([reference_logits], [logits(candidate, calibration)])
        row[f"{name} agreement"] = meter.top1
        row[f"{name} error"] = meter.relative_error
    kept = bnpass.reestimate_batchnorms(compressed_onnx, batches, batch_size=BATCH_SIZE, num_samples=len(calibration),
                                        device="cpu", reference=uncompressed_onnx)
    row["pick"] = "reestimated" if kept.chosen == "reestimated" else "matched"  # matched BNs, with or without logits
    row["kept"] = kept.chosen
    return row


def _accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    return float((logits(model, images).argmax(1) == labels).mean())


COLUMNS = {"uncompressed": "unc", "compressed": "comp", "reestimated": "re-est", "matched": "matched",
           "compressed agreement": "agr comp", "reestimated agreement": "agr re-est",
           "matched agreement": "agr matched", "reestimated error": "err re-est", "matched error": "err matched"}


def print_table(rows: dict, title: str) -> None:
    print(title)
    print(f"{'deployment':<12} {'compression':<11} " + " ".join(f"{short:>11}" for short in COLUMNS.values())
          + "  --reference keeps")
    for (deployment, compression), row in rows.items():
        difference = row["matched"] - row["reestimated"]
        better = "tie" if abs(difference) < 0.01 else "matched" if difference > 0 else "reestimated"
        verdict = "right" if better in (row["pick"], "tie") else "WRONG"
        print(f"{deployment:<12} {compression:<11} "
              + " ".join(f"{row[c]:>11.1%}" if "error" not in c else f"{row[c]:>11.3f}" for c in COLUMNS)
              + f"  {row.get('kept', row['pick'])} ({verdict})")
    print("(unc/comp/re-est/matched: test accuracy; agr: top-1 agreement with the uncompressed model and err: "
          "its relative output error, on the calibration images; kept: what --reference keeps, without labels: "
          "right when it is the more accurate of re-estimated and matched or their accuracies differ by less "
          "than 1 point)")


def run_seed(seed: int, epochs: int):
    (train_images, train_labels), scenes = deployments(seed)
    model = train(train_images, train_labels, seed, epochs)
    compressed = {name: compress(model) for name, compress in COMPRESSIONS.items()}
    rows = {(deployment, name): measure(model, compressed[name], *scene)
            for deployment, scene in scenes.items() for name in COMPRESSIONS}
    return model, compressed, scenes, rows


def write_example(output_dir: Path, model, compressed, scenes) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    calibration_sample = torch.from_numpy(scenes["in-domain"][0][:2])
    onnx.save(export_with_batchnorm_kept(model, calibration_sample), str(output_dir / "model.onnx"))
    onnx.save(export_with_batchnorm_kept(compressed[SHIPPED_COMPRESSION], calibration_sample),
              str(output_dir / "model_compressed.onnx"))
    for deployment, (calibration, test_images, test_labels) in scenes.items():
        write_calibration_batches(calibration, output_dir / deployment / "calib", BATCH_SIZE)
        np.savez_compressed(output_dir / deployment / "test.npz", images=test_images, labels=test_labels)


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if arguments.sweep:
        per_seed = [run_seed(seed, arguments.epochs)[3] for seed in range(arguments.sweep)]
        for seed, rows in enumerate(per_seed):
            print_table(rows, f"seed {seed}")
        medians = {key: {column: statistics.median(rows[key][column] for rows in per_seed) for column in COLUMNS}
                   for key in per_seed[0]}
        for key, row in medians.items():   # the pick the majority of seeds made
            row["pick"] = statistics.mode(rows[key]["pick"] for rows in per_seed)
        print_table(medians, f"median over seeds 0-{arguments.sweep - 1} (picks: the most frequent pick)")
        return 0
    model, compressed, scenes, rows = run_seed(arguments.seed, arguments.epochs)
    print_table(rows, f"seed {arguments.seed}: test accuracy, then top-1 agreement with the uncompressed model on "
                      f"{CALIBRATION_SIZE} calibration images")
    write_example(arguments.output_dir, model, compressed, scenes)
    print(f"wrote {arguments.output_dir} (model_compressed.onnx: {SHIPPED_COMPRESSION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
