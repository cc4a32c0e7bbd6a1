"""Ctrl-C (and SIGTERM in training), held back from the moments that must not be cut in two."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

REPEAT_S = 1.0  # the same signal again within this of the first is the same stop, delivered twice


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, as the command line raises it. CPython (3.11 at least) ends a `python -m` process by SIGINT (exit
    -2), whatever status it returns, once a KeyboardInterrupt (that class exactly) has left an exec() or eval()
    of a string, caught or not. Dataclasses and namedtuples build their methods with exec, so a Ctrl-C during
    start-up's imports made `gptgen: interrupted` exit -2 instead of 130 (5 times in 250 here); a subclass is
    not taken for it."""


@contextlib.contextmanager
def ctrl_c_raises_interrupted() -> Iterator[None]:
    """During the block a Ctrl-C raises Interrupted where Python would raise KeyboardInterrupt (a handler that a
    caller set, or SIG_IGN, is left alone)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def sigint_noted(signums: tuple[int, ...] = (signal.SIGINT,), again_raises: bool = False
                 ) -> Iterator[Callable[[], bool]]:
    """A Ctrl-C (SIGINT; or any of `signums`) during the block is only noted; the block asks whether one came and
    stops where it is safe to. With `again_raises`, a second one raises Interrupted at once: for a user who will
    not wait for the stop's own work (training's eval and save). A handler, not a signal mask: the kernel gives
    a signal to any thread that does not mask it (tqdm's monitor, torch's pool), and Python then interrupts the
    main thread all the same. Only the main thread handles signals; elsewhere none is noted. A signal this
    process was told to ignore (SIG_IGN: a shell's background job ignores Ctrl-C) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    caught = []  # (signum, time.monotonic())

    def note(signum, frame):
        # one stop that reaches the process twice is not a second one: SLURM signals every process of a job, and
        # torchrun then passes its own signal on to its workers. Timed from the first: counted from the latest,
        # Ctrl-C pressed again and again under a second apart never stopped at once.
        if caught and again_raises and not (signum == caught[0][0] and time.monotonic() - caught[0][1] < REPEAT_S):
            raise Interrupted
        caught.append((signum, time.monotonic()))

    previous = {signum: signal.signal(signum, note) for signum in signums
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield lambda: bool(caught)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """A Ctrl-C during the block is delivered when the block is done, where it interrupts as usual."""
    with sigint_noted() as came:
        yield
    if came():
        signal.raise_signal(signal.SIGINT)  # to the handler that was there (an outer block's, or Python's)
