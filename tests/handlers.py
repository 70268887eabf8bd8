"""Worker handlers shared by the loopback tests."""

from __future__ import annotations

import asyncio
from typing import Any


class Gate:
    """A handler that blocks until released, recording entry and cancellation."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self, variables: Any) -> Any:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return variables


async def echo(variables: Any) -> Any:
    return variables
