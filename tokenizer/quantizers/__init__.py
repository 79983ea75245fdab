"""Quantizer family behind one interface (see ``base.py``) and a registry by name."""
from __future__ import annotations

import importlib
from typing import Any

from tokenizer.quantizers.base import Quantizer, QuantizerOutput

QUANTIZERS: dict[str, str] = {
    # name -> "module:Class"; imported lazily so one broken module cannot hide the others
    "lgq": "tokenizer.quantizers.lgq:LGQuantizer",
    "vq": "tokenizer.quantizers.vq:VectorQuantizer",
    "fsq": "tokenizer.quantizers.fsq:FSQuantizer",
    "simvq": "tokenizer.quantizers.simvq:SimVQuantizer",
    "lfq": "tokenizer.quantizers.lfq:LFQuantizer",
    "ibq": "tokenizer.quantizers.ibq:IBQuantizer",
}


def quantizer_class(name: str) -> type[Quantizer]:
    key = str(name).lower()
    if key not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    module_name, class_name = QUANTIZERS[key].split(":")
    # relative to this package when the name is relative (as in the code a pipeline folder carries: remote_code.py)
    return getattr(importlib.import_module(module_name, __package__), class_name)


def build_quantizer(name: str, dim: int, codebook_size: int, **options: Any) -> Quantizer:
    """Build a quantizer by name: ``build_quantizer("lgq", dim=64, codebook_size=16384, tau_end=0.1)``."""
    cls = quantizer_class(name)
    try:
        return cls(dim=dim, codebook_size=codebook_size, **options)
    except TypeError as err:  # unknown option names
        raise ValueError(f"bad options for quantizer {name!r}: {err}") from err


__all__ = ["Quantizer", "QuantizerOutput", "QUANTIZERS", "build_quantizer", "quantizer_class"]
