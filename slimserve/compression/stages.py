"""Every compression stage, keyed by its recipe name and by its config type.

A new stage is one module that ends in a ``STAGE = StageSpec(...)``, plus its line here.

Imports every stage module.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from slimserve.compression import distill, evaluate, finetune, prune, quantize, speculate
from slimserve.compression.stage import StageConfig, StageSpec

_ALL: Final[tuple[StageSpec[Any], ...]] = (
    prune.STAGE,
    distill.STAGE,
    finetune.STAGE,
    quantize.STAGE,
    evaluate.STAGE,
    speculate.STAGE,
)

#: Recipe stage name -> its spec, in the order stages run.
STAGES: Final[Mapping[str, StageSpec[Any]]] = MappingProxyType({s.name: s for s in _ALL})
_BY_CONFIG: Final[Mapping[type[StageConfig], StageSpec[Any]]] = MappingProxyType(
    {s.config: s for s in _ALL}
)


def spec_of(config: StageConfig) -> StageSpec[Any]:
    """The stage that runs ``config``.

    Raises:
        KeyError: a config type no stage runs.
    """
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise KeyError(f"no stage runs {type(config).__name__}") from None
