"""Group commit: one thread owns the SQLite connection and commits in batches.

Callers on the event loop submit small functions; the thread runs everything
queued so far in one transaction (each function inside its own SAVEPOINT, so
one failing call does not undo the others) and pays one fsync for the batch.
A call's future resolves only after its batch is committed, so "returned"
still means "durable".
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_MAX_BATCH = 256


@dataclass
class _Call(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle_all(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in items:
        _settle(future, ok, value)


class GroupCommitWriter:
    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._ready: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._loop = loop
        self._thread.start()
        await self._ready

    async def submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Call(fn, future, loop))
        return await future

    async def stop(self) -> None:
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _main(self) -> None:
        assert self._ready is not None
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to start()
            self._loop.call_soon_threadsafe(_settle, self._ready, False, exc)
            return
        self._loop.call_soon_threadsafe(_settle, self._ready, True, None)
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch: list[_Call[Any]] = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._run_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    @staticmethod
    def _run_batch(conn: sqlite3.Connection, batch: list[_Call[Any]]) -> None:
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for call in batch:
                conn.execute("SAVEPOINT call")
                try:
                    value = call.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                    results.append((False, exc))
                else:
                    conn.execute("RELEASE call")
                    results.append((True, value))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # The commit itself failed (disk full, I/O error): nothing in the
            # batch is durable, so every call fails.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [(False, exc)] * len(batch)
        # One wake-up of each event loop per batch, not one per call.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for call, (ok, value) in zip(batch, results, strict=True):
            by_loop.setdefault(call.loop, []).append((call.future, ok, value))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, items)
