"""``Pool``: ``multiprocessing.pool.Pool`` whose task and result queues are channels.

Only the two queues change (``_setup_queues``); the standard library's task, result and
worker-handler threads and its ``worker`` function run as they are. Each task (the function
by reference, its arguments) and each result crosses as one channel message, so arrays and
tensors in them travel through the slab. The pool's wake-up queue stays the standard
library's: its handler thread waits on it with ``multiprocessing.connection.wait``.
"""

from __future__ import annotations

import multiprocessing.pool
from typing import Any

from ..exceptions import Empty
from .queues import SimpleQueue


class Pool(multiprocessing.pool.Pool):
    """``multiprocessing.Pool`` with tasks and results carried through slabs.

    ``context`` may be a ``multiprocessing`` context or one of
    ``tensorslab.multiprocessing.get_context``.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Any = None,
        initargs: tuple = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
    ) -> None:
        # The pool also makes its wake-up queue from the context; that one must stay a pipe.
        context = getattr(context, "_stdlib_context", context)
        super().__init__(processes, initializer, initargs, maxtasksperchild, context)

    def _setup_queues(self) -> None:
        self._inqueue = SimpleQueue()
        self._outqueue = SimpleQueue()
        self._quick_put = self._inqueue.put
        self._quick_get = self._outqueue.get

    def _get_sentinels(self) -> list:
        # The standard pool also wakes its worker handler when results arrive (the result
        # pipe); workers' exits and the wake-up queue (cache emptied, state changes) are
        # what it acts on, as in ThreadPool.
        return [self._change_notifier._reader]

    @staticmethod
    def _help_stuff_finish(inqueue: SimpleQueue, task_handler: Any, size: int) -> None:
        # The task handler may be waiting for room on the task queue: take tasks off it
        # until the handler has finished.
        while task_handler.is_alive():
            try:
                inqueue._get_nowait()
            except Empty:
                return
