import contextlib
import signal
from types import SimpleNamespace

import pytest

import gptgen.signals
from gptgen.signals import Interrupted, sigint_noted

pytestmark = pytest.mark.usefixtures("sigint_as_in_a_terminal")


def test_a_stop_noted_then_a_second_one_raises_but_not_the_same_one_delivered_twice(monkeypatch):
    """SLURM signals every process of a job and torchrun passes its own signal on: one stop reached a worker
    twice, and the second, taken for a user's impatient one, cut the eval and save short."""
    now = [100.0]
    monkeypatch.setattr(gptgen.signals, "time", SimpleNamespace(monotonic=lambda: now[0]))
    with sigint_noted((signal.SIGINT, signal.SIGTERM), again_raises=True) as stopped:
        assert not stopped()
        signal.raise_signal(signal.SIGTERM)
        now[0] += gptgen.signals.REPEAT_S * 0.9
        signal.raise_signal(signal.SIGTERM)  # the same stop, delivered again
        assert stopped()
        with pytest.raises(Interrupted):
            signal.raise_signal(signal.SIGINT)  # another signal: a second stop, at once
    with sigint_noted((signal.SIGINT, signal.SIGTERM), again_raises=True):
        signal.raise_signal(signal.SIGINT)
        now[0] += gptgen.signals.REPEAT_S * 1.1
        with pytest.raises(Interrupted):
            signal.raise_signal(signal.SIGINT)  # the same signal later: a user's second Ctrl-C


def test_without_again_raises_every_stop_is_only_noted():
    with sigint_noted() as stopped:
        for _ in range(3):
            signal.raise_signal(signal.SIGINT)
        assert stopped()


def test_ctrl_c_pressed_again_and_again_stops_at_once_a_second_after_the_first(monkeypatch):
    """Each press was timed from the one before: presses under a second apart never stopped the run at once."""
    now = [100.0]
    monkeypatch.setattr(gptgen.signals, "time", SimpleNamespace(monotonic=lambda: now[0]))
    with sigint_noted((signal.SIGINT, signal.SIGTERM), again_raises=True), pytest.raises(Interrupted):
        for _ in range(4):
            signal.raise_signal(signal.SIGINT)
            now[0] += gptgen.signals.REPEAT_S * 0.4  # the fourth press comes 1.2 s after the first


def test_a_signal_the_process_ignores_stays_ignored():
    """A shell's background job ignores Ctrl-C: `gptgen train ... &` in a script stopped with the script's Ctrl-C."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigint_noted((signal.SIGINT, signal.SIGTERM), again_raises=True) as stopped:
            signal.raise_signal(signal.SIGINT)
            assert not stopped()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("leave", ["normally", "by Interrupted"])
def test_the_handlers_before_are_put_back(leave):
    """A handler left installed would note a later Ctrl-C (at the CLI's prompt, in a notebook) instead of stopping."""
    def mine(signum, frame):
        pass

    before = {signum: signal.signal(signum, mine) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Interrupted) if leave == "by Interrupted" else contextlib.nullcontext():
            with sigint_noted((signal.SIGINT, signal.SIGTERM), again_raises=True):
                assert signal.getsignal(signal.SIGINT) is not mine and signal.getsignal(signal.SIGTERM) is not mine
                if leave == "by Interrupted":
                    signal.raise_signal(signal.SIGINT)
                    signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
