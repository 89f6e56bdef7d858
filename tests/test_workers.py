"""`--workers`' supervisor: its workers live and stop together, within a deadline."""

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import cast

from compter.cli import Workers

spawn = multiprocessing.get_context("spawn")


def ignore_sigterm(ready: Event) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(60)


def exit_cleanly_on_sigterm(ready: Event) -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    ready.set()
    time.sleep(60)


def sleep(ready: Event) -> None:
    """Like a worker still starting: SIGTERM's default action ends it."""
    ready.set()
    time.sleep(60)


def fail(ready: Event) -> None:
    ready.set()
    sys.exit(3)


def started(*targets: Callable[[Event], None]) -> tuple[Workers, list[BaseProcess]]:
    """Workers running `targets`, each past its set-up (the Event it is given and sets)."""
    ready = [spawn.Event() for _ in targets]
    processes = [
        spawn.Process(target=target, args=(event,), daemon=True) for target, event in zip(targets, ready, strict=True)
    ]
    workers = Workers(processes, stop_deadline_s=0.5)
    workers.start()
    for event in ready:
        assert event.wait(10), "a worker did not start"
    return workers, processes


class Siblings:
    """Workers that all exit just after the supervisor first sees one of them alive."""

    def __init__(self, count: int) -> None:
        self.alive = True
        read, write = os.pipe()
        os.close(write)
        self.sentinel = read  # at end of file, hence ready: like the sentinel of a process that has exited
        self.workers = [SeenAliveOnce(self) for _ in range(count)]


class SeenAliveOnce:
    pid = None

    def __init__(self, siblings: Siblings) -> None:
        self._siblings = siblings
        self.sentinel = siblings.sentinel

    def is_alive(self) -> bool:
        alive, self._siblings.alive = self._siblings.alive, False
        return alive

    @property
    def exitcode(self) -> int | None:
        return None if self._siblings.alive else 0


def test_workers_that_exit_while_the_supervisor_looks_do_not_leave_it_waiting_forever() -> None:
    siblings = Siblings(2)
    workers = Workers(cast(list[BaseProcess], siblings.workers))
    outcome: list[int] = []
    waiting = threading.Thread(target=lambda: outcome.append(workers.wait()), daemon=True)
    waiting.start()
    waiting.join(5)
    assert outcome == [0], "the supervisor still waits for workers that have all exited"
    os.close(siblings.sentinel)


def test_when_one_worker_fails_the_others_are_stopped_and_its_exit_code_is_the_supervisors() -> None:
    workers, (failing, clean, killed) = started(fail, exit_cleanly_on_sigterm, sleep)
    started_at = time.monotonic()
    assert workers.wait() == 3
    assert time.monotonic() - started_at < 5
    assert (failing.exitcode, clean.exitcode, killed.exitcode) == (3, 0, -signal.SIGTERM)


def test_stopped_workers_exit_0_even_those_that_die_of_the_sigterm() -> None:
    workers, processes = started(exit_cleanly_on_sigterm, sleep)
    workers.stop()
    assert workers.wait() == 0
    assert [process.exitcode for process in processes] == [0, -signal.SIGTERM]


def test_workers_that_do_not_stop_are_killed_at_the_deadline() -> None:
    workers, processes = started(ignore_sigterm, exit_cleanly_on_sigterm)
    stopping_at = time.monotonic()
    workers.stop()
    assert workers.wait() == signal.SIGKILL
    assert 0.5 <= time.monotonic() - stopping_at < 3
    assert [process.exitcode for process in processes] == [-signal.SIGKILL, 0]
