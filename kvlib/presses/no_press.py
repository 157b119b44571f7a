from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from kvlib.presses.base import Press
from kvlib.presses.registry import register


@register
@dataclass
class NoPress(Press):
    """The uncompressed baseline: the model runs exactly as it would without kvlib."""

    name = "none"

    def __post_init__(self) -> None:
        if self.compression_ratio != 0:
            raise ValueError(
                f"the 'none' press removes nothing: compression_ratio must be 0; got {self.compression_ratio!r}"
            )

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[nn.Module]:
        yield model
