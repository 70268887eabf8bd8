"""The packet class decorator, in a module of its own so it stays plain Python.

`dataclass_transform` marks the decorator by setting an attribute on it, which
a mypyc-compiled function cannot take; packets.py is compiled, this is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

_P = TypeVar("_P")


@dataclass_transform(frozen_default=True)
def packet(cls: type[_P]) -> type[_P]:
    """A slotted dataclass that the type checker holds frozen.

    Not frozen at run time: a frozen dataclass sets each field through
    `object.__setattr__`, which made building a RUN cost 0.84 us instead of
    0.18. (RUN and RESULT, four of which every job builds, have since been
    written by hand for mypyc: see packets.Record.) Nothing assigns to a packet's
    field (mypy --strict refuses it, tests/test_protocol.py checks that), so
    the guarantee stays; packets keep a hash by value like frozen ones.
    """
    return dataclass(slots=True, unsafe_hash=True)(cls)
