"""Field checks derived from annotations: Literal choices and numeric Bounds."""

import dataclasses
from typing import Annotated, Literal

import pytest

from metalearn.core.config_io import AtLeastOne, Bound, ConfigError, Fraction, check_fields


@dataclasses.dataclass(frozen=True)
class Example:
    count: AtLeastOne = 1
    share: Fraction = 0.0
    factor: Annotated[float, Bound(1, open_low=True)] = 2.0
    mode: Literal["a", "b"] = "a"
    free: int = -5  # no bound: never checked

    def __post_init__(self):
        check_fields(self, "example")


@pytest.mark.parametrize("field,value,message", [
    ("count", 0, "example.count must be >= 1, got 0"),
    ("count", 1.5, "example.count must be an integer, got 1.5"),
    ("count", True, "example.count must be an integer, got True"),
    ("share", 1.0, r"example.share must be in \[0, 1\), got 1.0"),
    ("share", float("nan"), r"example.share must be in \[0, 1\), got nan"),
    ("factor", 1.0, "example.factor must be > 1, got 1.0"),
    ("factor", "2", "example.factor must be a number, got '2'"),
    ("mode", "c", r"example.mode must be one of \['a', 'b'\], got 'c'"),
])
def test_values_outside_the_annotation_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        Example(**{field: value})


def test_values_inside_the_annotation_pass():
    example = Example(count=3, share=0.5, factor=1.01, mode="b")
    assert (example.count, example.share, example.factor, example.mode) == (3, 0.5, 1.01, "b")
    assert Bound(0, open_low=True).describe() == "positive"
    assert Bound(0, 360).describe() == "in [0, 360]"
