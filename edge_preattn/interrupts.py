"""Ctrl-C during native calls: held until the call returns, then raised where Python can unwind.

llama.cpp calls back into Python (the hooks, the expert cache's controller, the log) from inside
llama_decode. Python runs a SIGINT handler at the next bytecode, which is usually inside one of those
callbacks; a KeyboardInterrupt raised there is swallowed by ctypes ("Exception ignored on calling
ctypes callback function"), so prediction modes used to ignore Ctrl-C and finish the run, and
`collect` ended with a half-captured token. Around a native call, SIGINT only sets a flag; the
KeyboardInterrupt follows when the call returns, at a token or ubatch boundary.

Setup is held the same way (the verb modules' imports, `run`'s loads, building the expert cache):
the native init of numpy, onnxruntime and onnx turns a KeyboardInterrupt raised inside it into an
ImportError or a C++ terminate (an abort), and one raised between creating the cache and entering it
would leave native state that nothing frees.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT for the duration of the block, then raise KeyboardInterrupt if one came.

    A no-op off the main thread (signals are only delivered to it), inside another `deferred()`
    block, and where the process has its own SIGINT handler or ignores SIGINT.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
