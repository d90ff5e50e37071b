"""The controller's one background thread: predictions made in Python (onnxruntime) and their uploads
run there, off the decode thread; the library's own predictor never submits to it."""

import concurrent.futures
import queue
import threading


class PrefetchWorker:
    """The controller's one background thread. A daemon, so a predictor that never returns cannot keep
    the process alive; with a bounded backlog, so it cannot grow memory without end either."""

    def __init__(self, max_backlog: int) -> None:
        self.max_backlog, self.backlog = max_backlog, 0  # submitted and not finished
        self.lock = threading.Lock()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def submit(self, work) -> concurrent.futures.Future | None:
        """None when the backlog is full: the caller goes on without this prediction."""
        with self.lock:
            if self.backlog >= self.max_backlog:
                return None
            self.backlog += 1
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((work, future))
        return future

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            work, future = item
            try:
                future.set_result(work())
            except BaseException as error:  # delivered to whoever waits on the future
                future.set_exception(error)
            finally:
                with self.lock:
                    self.backlog -= 1

    def close(self, timeout_s: float) -> bool:
        """Finish the backlog and stop; False when the thread is still busy after timeout_s."""
        self.queue.put(None)
        self.thread.join(timeout_s)
        return not self.thread.is_alive()
