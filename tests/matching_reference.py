"""An independent reference for ``--reference``: matching level by level, in PyTorch.

Written from the issue's definition, without bnpass: at each BN depth, measure the pooled
per-channel mean and biased variance of every BN input of that depth, in the uncompressed model
(inference mode, as it is) and in the compressed one (inference mode, every upstream BN already
matched), apply the formula, go one level deeper::

    sqrt(v' + e) = sqrt(v_c) * sqrt(v_r + e) / sqrt(v_o),      v' = max(that^2 - e, 0)
    mu'          = m_c - sqrt(v' + e) * (m_o - mu_r) / sqrt(v_r + e)

A channel constant in either model (``v <= tolerance^2 * max(m^2, v_r + e)``) keeps the stored
scale and gets the mean that reproduces the reference's output mean (bnpass.matching's rule).

Moments are taken on the concatenated BN inputs in float64 (the data are small); nothing here
streams. :func:`match_one_pass` is the form the product's one-pass calibration graph will take:
one forward pass of both models per batch, each compressed BN normalizing with the statistics
matched on that batch's moments, and the final statistics matched on the moments pooled over all
batches. With one batch holding every sample the two agree exactly (tested).

The network has BNs at four depths and a residual branch: Conv-BN, depthwise Conv-BN, a residual
Add of two BN branches (1x1 and 3x3), and Linear-BatchNorm1d. :func:`magnitude_prune` and
:func:`fake_quantize` compress its weights after the fact, BN untouched, as a deployment pipeline
does after export.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

DEFAULT_TOLERANCE = 1e-5


class ResidualNet(nn.Module):
    """conv3x3 -> BN -> ReLU -> depthwise 3x3 -> BN -> ReLU -> (1x1 -> BN) + (3x3 -> BN) -> ReLU
    -> 2x2 max pool -> flatten -> Linear -> BatchNorm1d -> ReLU -> Linear (classes).

    ``width`` channels throughout; inputs ``(N, in_channels, size, size)``."""

    def __init__(self, in_channels: int = 3, width: int = 8, size: int = 8, classes: int = 5, hidden: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.bn2 = nn.BatchNorm2d(width)
        self.branch_a = nn.Conv2d(width, width, 1)
        self.bn3a = nn.BatchNorm2d(width)
        self.branch_b = nn.Conv2d(width, width, 3, padding=1)
        self.bn3b = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * (size // 2) ** 2, hidden)
        self.bn4 = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        x = torch.relu(self.bn3a(self.branch_a(x)) + self.bn3b(self.branch_b(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.head(torch.relu(self.bn4(self.fc(x))))

    @staticmethod
    def batchnorm_levels() -> list:
        """Names of the BN modules by depth: each level reads only BNs of earlier levels."""
        return [["bn1"], ["bn2"], ["bn3a", "bn3b"], ["bn4"]]


def batchnorms(model: nn.Module) -> dict:
    """``{module name: BN module}`` in definition order (which is graph order here)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)}


def make_network(seed: int = 0, **sizes) -> ResidualNet:
    """A ResidualNet with random weights and non-trivial BN parameters and stored statistics."""
    torch.manual_seed(seed)
    model = ResidualNet(**sizes)
    with torch.no_grad():
        for module in batchnorms(model).values():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-1, 1)
            module.running_var.copy_(torch.randn(module.num_features).abs() + 0.5)
    return model.eval()


def compressible_layers(model: nn.Module) -> list:
    """Every Conv and Linear except the first and the last, as pruning practice keeps them."""
    layers = [module for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    return layers[1:-1]


def magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """Copy with the ``sparsity`` fraction of smallest-magnitude weights zeroed in each inner layer."""
    compressed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in compressible_layers(compressed):
            weight = layer.weight
            count = int(round(sparsity * weight.numel()))
            if count:
                threshold = weight.abs().flatten().kthvalue(count).values
                weight.mul_((weight.abs() > threshold).to(weight.dtype))
    return compressed.eval()


def fake_quantize(model: nn.Module, bits: int = 4) -> nn.Module:
    """Copy with each inner layer's weights rounded to ``bits``-bit symmetric per-tensor levels."""
    compressed = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for layer in compressible_layers(compressed):
            scale = layer.weight.abs().max() / levels
            layer.weight.copy_(torch.clamp(torch.round(layer.weight / scale), -levels - 1, levels) * scale)
    return compressed.eval()


def channel_moments(values: torch.Tensor):
    """Per-channel (axis 1) mean and biased variance over every other axis, in float64."""
    values = values.detach().double().transpose(0, 1).reshape(values.shape[1], -1)
    return values.mean(dim=1), values.var(dim=1, unbiased=False)


def batchnorm_inputs(model: nn.Module, names: list, data: torch.Tensor) -> dict:
    """``{name: input of that BN}`` for one inference-mode forward pass of ``data``."""
    captured, modules, hooks = {}, batchnorms(model), []
    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda module, inputs, name=name: captured.__setitem__(name, inputs[0].detach())))
    try:
        with torch.no_grad():
            model.eval()(data)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def matched_statistics(bn: nn.Module, reference_moments, compressed_moments, tolerance: float = DEFAULT_TOLERANCE):
    """``(mu', v')`` in float64 for ``bn`` from (m_o, v_o) and (m_c, v_c), as the issue writes it."""
    (m_o, v_o), (m_c, v_c) = reference_moments, compressed_moments
    mu_r, v_r, e = bn.running_mean.double(), bn.running_var.double(), float(bn.eps)
    stored_scale = torch.sqrt(v_r + e)
    constant = (v_o <= tolerance ** 2 * torch.maximum(m_o ** 2, v_r + e)) \
        | (v_c <= tolerance ** 2 * torch.maximum(m_c ** 2, v_r + e))
    target_scale = torch.where(constant, stored_scale, torch.sqrt(v_c) * stored_scale / torch.sqrt(v_o))
    var = torch.clamp(target_scale ** 2 - e, min=0.0)
    mean = m_c - torch.sqrt(var + e) * (m_o - mu_r) / stored_scale
    return mean, var


def _set_statistics(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def match_level_by_level(reference: nn.Module, compressed: nn.Module, data: torch.Tensor, levels: list,
                         tolerance: float = DEFAULT_TOLERANCE):
    """Copy of ``compressed`` whose BNs are matched to ``reference``'s, one depth at a time.

    Returns ``(matched model, moments)`` with ``moments[name] = ((m_o, v_o), (m_c, v_c))``, the
    float64 moments the statistics of BN ``name`` were matched on.
    """
    matched = copy.deepcopy(compressed).eval()
    matched_bns, moments = batchnorms(matched), {}
    for level in levels:
        reference_inputs = batchnorm_inputs(reference, level, data)
        compressed_inputs = batchnorm_inputs(matched, level, data)  # upstream levels already matched
        for name in level:
            moments[name] = (channel_moments(reference_inputs[name]), channel_moments(compressed_inputs[name]))
            _set_statistics(matched_bns[name], *matched_statistics(matched_bns[name], *moments[name], tolerance))
    return matched, moments


def match_one_pass(reference: nn.Module, compressed: nn.Module, batches: list,
                   tolerance: float = DEFAULT_TOLERANCE):
    """Copy of ``compressed`` matched in one pass over ``batches`` (see the module docstring).

    Per batch: the reference runs as it is; each compressed BN normalizes with the statistics
    matched on this batch's moments of both inputs. The final statistics are matched on the
    inputs' moments pooled over all batches (concatenated: the data are small).
    """
    matched = copy.deepcopy(compressed).eval()
    matched_bns, names = batchnorms(matched), list(batchnorms(compressed))
    seen = {name: ([], []) for name in names}   # reference inputs, compressed inputs, per batch
    current: dict = {}

    def normalize_with_batch_matched_statistics(module, inputs, name):
        reference_input, compressed_input = current[name], inputs[0].detach()
        seen[name][0].append(reference_input)
        seen[name][1].append(compressed_input)
        _set_statistics(module, *matched_statistics(
            stored_bns[name], channel_moments(reference_input), channel_moments(compressed_input), tolerance))

    stored_bns = batchnorms(copy.deepcopy(compressed))   # the stored (mu_r, v_r), never overwritten
    hooks = [matched_bns[name].register_forward_pre_hook(
        lambda module, inputs, name=name: normalize_with_batch_matched_statistics(module, inputs, name))
        for name in names]
    try:
        for batch in batches:
            current = batchnorm_inputs(reference, names, batch)
            with torch.no_grad():
                matched(batch)
    finally:
        for hook in hooks:
            hook.remove()
    for name in names:
        reference_moments = channel_moments(torch.cat(seen[name][0]))
        compressed_moments = channel_moments(torch.cat(seen[name][1]))
        _set_statistics(matched_bns[name], *matched_statistics(stored_bns[name], reference_moments,
                                                               compressed_moments, tolerance))
    return matched


def predictions(model: nn.Module, data: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(data).argmax(dim=1).numpy()
