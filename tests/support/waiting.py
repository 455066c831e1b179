"""The one polling wait of the test suites and benchmarks."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_until(condition: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0,
                     what: str = "condition", *, interval: float = 0.02) -> Any:
    """Poll ``condition`` (a function, or a coroutine function) until it returns
    something true, and return that; fail (AssertionError naming ``what``) after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
