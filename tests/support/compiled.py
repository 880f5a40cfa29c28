"""Whether mer's numba kernels compile (or load from cache) anything new in this process."""

from __future__ import annotations

import sys

import numba

from mer.sampling import SamplingParams


def compiled_kernels() -> int:
    """How many compiled specialisations mer's numba kernels hold in this process."""
    count = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("mer."):
            continue
        for value in list(vars(module).values()):
            for obj in (value, *vars(value).values()) if isinstance(value, type) else (value,):
                if isinstance(obj, numba.core.registry.CPUDispatcher):
                    count += len(obj.overloads)
    return count


def no_compilation_after_warm_up(model) -> None:
    """After `model.warm_up()`, prefill, decode and generation add no kernel specialisation."""
    model.warm_up()
    before = compiled_kernels()
    prompt = list(range(3, 15))
    model.logits(prompt)  # prefill
    model.logits(prompt[:5], chunk_size=1)  # decode, one token at a time
    list(model.generate(prompt[:3], SamplingParams(temperature=0.0), 4, stop_ids=frozenset()))
    assert compiled_kernels() == before
