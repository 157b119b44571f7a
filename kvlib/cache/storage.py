"""How the kept prefix is stored: float (as the model computes it) or quantized by one of transformers' own
quantized cache layers (optimum-quanto, HQQ, fp8).

A precision is named `none`, `fp8` or `BACKEND-intN` (`quanto-int4`, `hqq-int8`, ...). The order is fixed: a press
scores the full-precision prefill and prunes it, *then* each full-attention layer's kept positions are handed to a
fresh quantized layer of transformers (`QuantoQuantizedLayer`, `HQQQuantizedLayer`, `Fp8QuantizedLayer`), exactly
as `QuantizedCache` would receive the prefill: the first `update` quantizes everything. Tokens fed afterwards go
through that layer's full-precision residual window as in transformers. Sliding-window layers stay as transformers
builds them (float, their window only): `QuantizedCache` refuses hybrid models, and this construction is what it
would be if it did not; on a model with only full-attention layers it is exactly `QuantizedCache`'s.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    Fp8QuantizedLayer,
    HQQQuantizedLayer,
    QuantoQuantizedLayer,
)

FLOAT = "none"
# backend -> (transformers layer class, the package it needs, bit widths it supports, the axes it supports)
BACKENDS = {
    "quanto": (QuantoQuantizedLayer, "optimum.quanto", "optimum-quanto", (2, 4), (0, -1)),
    "hqq": (HQQQuantizedLayer, "hqq", "hqq", (1, 2, 3, 4, 8), (0, 1)),
}
# transformers' own defaults of QuantizedLayer (kvlib measured no better ones; see README)
DEFAULT_OPTIONS = {"q_group_size": 64, "residual_length": 128, "axis_key": 0, "axis_value": 0}


def precision_names() -> list[str]:
    """Every precision kvlib knows, in order of bits."""
    names = [FLOAT, "fp8"]
    for backend, (_, _, _, bits, _) in BACKENDS.items():
        names += [f"{backend}-int{n}" for n in sorted(bits, reverse=True)]
    return names


@dataclass(frozen=True)
class Storage:
    """One precision of the kept prefix: its name and, for the group-wise integer backends, their options."""

    name: str = FLOAT
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def parse(cls, name: str, options: dict | None = None) -> Storage:
        """Check the name and options (no weights, no backend import): ValueError naming what is allowed."""
        if name not in precision_names():
            raise ValueError(f"unknown kv_quant {name!r}; choose from {', '.join(precision_names())}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise ValueError(f"unknown kv_quant option(s) {unknown}; allowed: {', '.join(DEFAULT_OPTIONS)}")
        storage = cls(name, {**DEFAULT_OPTIONS, **options} if cls._grouped(name) else {})
        storage._check_options()
        return storage

    @staticmethod
    def _grouped(name: str) -> bool:
        return name.split("-")[0] in BACKENDS

    @property
    def quantized(self) -> bool:
        return self.name != FLOAT

    @property
    def backend(self) -> str | None:
        return None if self.name == FLOAT else self.name.split("-")[0]

    @property
    def nbits(self) -> int:
        return 8 if self.name == "fp8" else int(self.name.split("-int")[1]) if self.quantized else 32

    def _check_options(self) -> None:
        if not self._grouped(self.name):
            return
        _, _, _, _, axes = BACKENDS[self.backend]
        for name in ("q_group_size", "residual_length"):
            value = self.options[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "q_group_size" else 0):
                raise ValueError(f"kv_quant option {name} must be an integer >= {1 if name == 'q_group_size' else 0}; "
                                 f"got {value!r}")  # fmt: skip
        for name in ("axis_key", "axis_value"):
            if self.options[name] not in axes or isinstance(self.options[name], bool):
                raise ValueError(
                    f"kv_quant option {name} for the {self.backend} backend must be one of {list(axes)}; "
                    f"got {self.options[name]!r}"
                )

    def check_backend(self) -> None:
        """The backend's package is importable (ValueError naming the package to install)."""
        if self.backend in BACKENDS:
            _, module, package, _, _ = BACKENDS[self.backend]
            if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
                raise ValueError(f"kv_quant {self.name} needs the package {package}: pip install {package}")

    def check_head_dim(self, head_dim: int) -> None:
        """A group must tile a head: q_group_size divides the head dimension."""
        if self._grouped(self.name) and head_dim % self.options["q_group_size"]:
            raise ValueError(
                f"kv_quant option q_group_size {self.options['q_group_size']} does not divide the model's head "
                f"dimension {head_dim}; use a divisor of {head_dim}"
            )

    def identity(self) -> dict:
        """What identifies results stored this way (empty for float storage: identities from before stay valid)."""
        return {} if not self.quantized else {"kv_quant": self.name, "kv_quant_options": dict(self.options)}

    def new_layer(self):
        """A fresh transformers quantized layer for one full-attention layer."""
        if self.name == "fp8":
            return Fp8QuantizedLayer()
        layer_class = BACKENDS[self.backend][0]
        return layer_class(nbits=self.nbits, **self.options)

    def store(self, cache: Cache) -> Cache:
        """Quantize every full-attention layer of a (pruned) float cache in place, as `QuantizedCache` quantizes a
        prefill: the layer's first `update` receives all its kept positions. Sliding-window layers stay float."""
        if not self.quantized:
            return cache
        for idx, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer and layer.is_initialized:
                quantized = self.new_layer()
                quantized.update(layer.keys, layer.values)
                cache.layers[idx] = quantized
        return cache


def layer_kinds(cache: Cache) -> dict[str, int]:
    """How many layers of each class a cache holds (README and report: what each layer type stores)."""
    kinds: dict[str, int] = {}
    for layer in cache.layers:
        kinds[type(layer).__name__] = kinds.get(type(layer).__name__, 0) + 1
    return kinds
