"""NNCF configuration files (``--config nncf.json``): the BN-adaptation sample count, input shapes.

What bnpass reads, as NNCF users write it (JSON with ``//`` and ``/* */`` comments and trailing
commas allowed, as NNCF's json5 loader accepts):

* ``compression``: one algorithm object or a list of them; the first that carries
  ``initializer.batchnorm_adaptation.num_bn_adaptation_samples`` gives the number of calibration
  samples (0 disables re-estimation);
* ``input_info``: one entry or a list (one per model input), each with ``sample_size``, checked
  against the model inputs (the batch axis excepted).

Command-line flags win over the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

from .errors import BnpassError

# Strings, or comments, or trailing commas; strings are matched first so "http://x" stays intact.
_JSON5_NOISE = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/|,(?=\s*[}\]])', re.S)


@dataclass(frozen=True)
class NncfSettings:
    num_samples: Optional[int]   # None when the file says nothing about BN adaptation
    sample_sizes: list           # one shape per model input; empty when not given


def _strip_json5(text: str) -> str:
    return _JSON5_NOISE.sub(lambda match: match.group(1) or "", text)


def read_nncf_config(path: str) -> NncfSettings:
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as error:
        raise BnpassError(f"cannot read config '{path}': {error.strerror or error}") from None
    try:
        config = json.loads(_strip_json5(text))
    except json.JSONDecodeError as error:
        raise BnpassError(f"config '{path}' is not valid JSON: {error.msg} at line {error.lineno}") from None
    if not isinstance(config, dict):
        raise BnpassError(f"config '{path}' must hold a JSON object")

    num_samples = None
    algorithms = config.get("compression", [])
    for algorithm in algorithms if isinstance(algorithms, list) else [algorithms]:
        adaptation = ((algorithm or {}).get("initializer") or {}).get("batchnorm_adaptation") or {}
        if "num_bn_adaptation_samples" in adaptation:
            value = adaptation["num_bn_adaptation_samples"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BnpassError(f"config '{path}': num_bn_adaptation_samples must be a whole number >= 0, "
                                  f"not {value!r}")
            num_samples = value
            break

    input_info = config.get("input_info", [])
    entries = input_info if isinstance(input_info, list) else [input_info]
    sample_sizes = []
    for entry in entries:
        size = entry.get("sample_size") if isinstance(entry, dict) else None
        if not isinstance(size, list) or not all(isinstance(d, int) for d in size):
            raise BnpassError(f"config '{path}': input_info.sample_size must be a list of integers")
        sample_sizes.append(size)
    return NncfSettings(num_samples=num_samples, sample_sizes=sample_sizes)


def check_sample_sizes(settings: NncfSettings, specs: list, path: str) -> None:
    """The config's input shapes must fit the model inputs (the batch axis is not compared)."""
    if not settings.sample_sizes:
        return
    if len(settings.sample_sizes) != len(specs):
        raise BnpassError(f"config '{path}' describes {len(settings.sample_sizes)} inputs in input_info; "
                          f"the model has {len(specs)}")
    for size, spec in zip(settings.sample_sizes, specs):
        fits = len(size) == len(spec.shape) and all(
            expected is None or got == expected for got, expected in zip(size[1:], spec.shape[1:]))
        if not fits:
            raise BnpassError(f"config '{path}': input_info.sample_size {size} does not fit model input "
                              f"{spec.describe()}")
