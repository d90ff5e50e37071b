"""Ctrl-C and SIGTERM during native calls: held until the call returns, then raised where Python can unwind.

llama.cpp calls back into Python (the hooks, the expert cache's controller, the log) from inside
llama_decode. Python runs a SIGINT handler at the next bytecode, which is usually inside one of those
callbacks; a KeyboardInterrupt raised there is swallowed by ctypes ("Exception ignored on calling
ctypes callback function"), so prediction modes used to ignore Ctrl-C and finish the run, and
`collect` ended with a half-captured token. Around a native call, SIGINT and SIGTERM only set a flag;
their handler runs when the call returns, at a token or ubatch boundary.

Setup is held the same way (the verb modules' imports, `run`'s loads, building the expert cache):
the native init of numpy, onnxruntime and onnx turns a KeyboardInterrupt raised inside it into an
ImportError or a C++ terminate (an abort), and one raised between creating the expert cache and
entering it would skip its close() (its hooks and threads outlive it).
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the duration of the block, then run the handler of the first that
    came (Python's for SIGINT raises KeyboardInterrupt; the command's for SIGTERM does too).

    Only signals with a Python handler are held: an ignored one (SIGINT in a script's background job)
    stays ignored, one left to the system still ends the process. Blocks nest: an inner one hands what
    it held to the outer one. A no-op off the main thread (signals are only delivered to it).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signum: signal.getsignal(signum) for signum in HELD_SIGNALS}
    handlers = {signum: handler for signum, handler in handlers.items() if callable(handler)}
    received: list[int] = []
    for signum in handlers:
        signal.signal(signum, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if received:
        handlers[received[0]](received[0], None)
