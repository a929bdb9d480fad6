"""Faults a test or benchmark asks a run for: a killed, paused or slow rank, a slow link.

    faults = read_faults(os.environ, restart_count())   # once, at the worker's entry
    hooks = faults.step_hooks(clock, traffic)            # the trainer's; empty without faults

Testing aids, not settings (no CLI flag, on purpose), each an environment variable that names a
global rank; this is the only module that reads them:
- SHARDWISE_TESTING_KILL=RANK:STEP: that rank SIGKILLs itself once it finished STEP, in the
  first attempt only (a restarted group must not be hit again).
- SHARDWISE_TESTING_PAUSE=RANK:STEP:SECONDS: that rank sleeps SECONDS after STEP, first attempt
  only, as a slow step would (its heartbeat beats on): a lone node trains on until a late one
  has joined, however fast the machine.
- SHARDWISE_TESTING_SLOW_RANK=RANK:FACTOR: that rank is a straggler whose compute takes FACTOR
  times as long (see `Straggler`).
- SHARDWISE_TESTING_COLLECTIVE_DELAY_S=SECONDS[:MBIT]: every rank's link is slow, the stand-in
  for benchmarks/support/netem.py where network namespaces cannot be made (see `SlowLink`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shardwise.errors import ShardwiseError
from shardwise.parallel.sync.traffic import SyncTraffic
from shardwise.train.timing import StepClock

KILL_ENV = "SHARDWISE_TESTING_KILL"
PAUSE_ENV = "SHARDWISE_TESTING_PAUSE"
SLOW_RANK_ENV = "SHARDWISE_TESTING_SLOW_RANK"
COLLECTIVE_DELAY_ENV = "SHARDWISE_TESTING_COLLECTIVE_DELAY_S"


@dataclass
class StepHooks:
    """What the training loop runs around each step: nothing, unless a test asked for faults.

    hooks = StepHooks(after_step=[print])   # print(step) once each step is done
    """

    before_forward: list[Callable[[], None]] = field(default_factory=list)  # clock started
    after_step: list[Callable[[int], None]] = field(default_factory=list)  # before the stop check


@dataclass(frozen=True)
class Faults:
    """The faults asked of this rank; `Faults()` (false) asks for none.

    Faults(kill_after=5).step_hooks(clock, traffic).after_step   # [SIGKILL after step 5]
    """

    kill_after: int | None = None
    pause_after: tuple[int, float] | None = None  # (step, seconds)
    slowdown: float = 1.0
    link: tuple[float, float] | None = None  # (seconds per exchange, bytes per second)

    def __bool__(self) -> bool:
        return self != Faults()

    def step_hooks(
        self, clock: StepClock, traffic: SyncTraffic, sleep: Callable[[float], None] = time.sleep
    ) -> StepHooks:
        """The loop's hooks for these faults, timed by this rank's `clock` and `traffic`."""
        hooks = StepHooks()
        if self.slowdown > 1:
            hooks.before_forward.append(Straggler(self.slowdown, clock, sleep))
        if self.link is not None:
            hooks.after_step.append(SlowLink(*self.link, traffic, sleep))
        if self.kill_after is not None:
            hooks.after_step.append(
                _at(self.kill_after, lambda: os.kill(os.getpid(), signal.SIGKILL))
            )
        if self.pause_after is not None:
            step, seconds = self.pause_after
            hooks.after_step.append(_at(step, lambda: sleep(seconds)))
        return hooks


def read_faults(environ: Mapping[str, str], attempt: int) -> Faults:
    """The faults the environment asks of this rank (RANK) in attempt `attempt` (0: the first).

    read_faults({"SHARDWISE_TESTING_KILL": "1:5", "RANK": "1"}, 0).kill_after   # 5
    """
    rank = int(environ.get("RANK", "0"))
    first = attempt == 0
    kill = _numbers(environ, KILL_ENV, "RANK:STEP, e.g. '1:5'", count=2, whole=2)
    pause = _numbers(environ, PAUSE_ENV, "RANK:STEP:SECONDS, e.g. '0:3:90'", count=3, whole=2)
    slow = _numbers(environ, SLOW_RANK_ENV, "RANK:FACTOR with FACTOR >= 1, e.g. '1:2'", 2, 1)
    if slow is not None and not slow[1] >= 1:
        _refuse(environ, SLOW_RANK_ENV, "RANK:FACTOR with FACTOR >= 1, e.g. '1:2'")
    return Faults(
        kill_after=int(kill[1]) if kill and first and kill[0] == rank else None,
        pause_after=(int(pause[1]), pause[2]) if pause and first and pause[0] == rank else None,
        slowdown=slow[1] if slow and slow[0] == rank else 1.0,
        link=_link(environ),
    )


class Straggler:
    """Before each step's forward, sleep (factor - 1) x the previous step's own compute.

    hooks.before_forward.append(Straggler(2.0, clock))   # this rank computes 2x slower

    Called once the step's clock started, so the rank joins this step's collectives (DDP's
    bucket all-reduces during backward, an exchange after the optimizer step) as late as a rank
    with that much slower compute would, and the sleep counts as its compute; a sleep at the
    first ready gradient instead would race DDP's own hooks on the same event. The previous step
    stands in for this one (the first is not slowed), without its own injected seconds, so that
    the slowdown does not compound.
    """

    def __init__(
        self, factor: float, clock: StepClock, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.factor, self.clock, self.sleep = factor, clock, sleep
        self.injected = 0.0  # the seconds added to the step now running

    def __call__(self) -> None:
        if self.clock.last_compute is None:
            return
        own = max(0.0, self.clock.last_compute - self.injected)
        self.injected = (self.factor - 1) * own
        self.sleep(self.injected)


class SlowLink:
    """After each step, sleep `delay_s` per exchange the sync strategy started plus its bytes
    at `bytes_per_s`, as time blocked in exchanges (the traffic's `seconds`, sync time).

    hooks.after_step.append(SlowLink(0.01, 1e6, traffic))   # 10 ms a collective, 1 MB/s

    What a strategy sends is counted where it sends it (parallel/sync/traffic.py): DDP's buckets
    through its comm hook, compressed ones at their width, local SGD's and DiLoCo's meetings,
    so the cost of a strategy's traffic reaches its step time without touching the collectives.
    """

    def __init__(
        self,
        delay_s: float,
        bytes_per_s: float,
        traffic: SyncTraffic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.delay_s, self.bytes_per_s, self.traffic, self.sleep = (
            delay_s,
            bytes_per_s,
            traffic,
            sleep,
        )
        self.seen = (0, 0)  # the traffic's bytes and exchanges already paid for

    def __call__(self, step: int) -> None:
        sent, exchanges = self.traffic.bytes - self.seen[0], self.traffic.exchanges - self.seen[1]
        self.seen = (self.traffic.bytes, self.traffic.exchanges)
        if exchanges or sent:
            with self.traffic.blocked():
                self.sleep(exchanges * self.delay_s + sent / self.bytes_per_s)


def _at(wanted: int, act: Callable[[], None]) -> Callable[[int], None]:
    def hook(step: int) -> None:
        if step == wanted:
            act()

    return hook


def _link(environ: Mapping[str, str]) -> tuple[float, float] | None:
    setting = environ.get(COLLECTIVE_DELAY_ENV, "").strip()
    if not setting:
        return None
    seconds, _, mbit = setting.partition(":")
    try:
        delay_s, rate = float(seconds), float(mbit or "inf")
    except ValueError:
        delay_s = rate = -1.0
    if not (delay_s >= 0 and rate > 0):
        _refuse(environ, COLLECTIVE_DELAY_ENV, "SECONDS[:MBIT], e.g. '0.3' or '0.01:8'")
    return delay_s, rate * 1e6 / 8


def _numbers(
    environ: Mapping[str, str], variable: str, expected: str, count: int, whole: int
) -> tuple[float, ...] | None:
    """The `count` numbers >= 0 of `variable`, the first `whole` of them whole (None: unset)."""
    value = environ.get(variable, "").strip()
    if not value:
        return None
    parts = value.split(":")
    try:
        numbers = tuple(float(part) for part in parts)
    except ValueError:
        numbers = ()
    valid = all(n >= 0 for n in numbers) and all(n.is_integer() for n in numbers[:whole])
    if len(numbers) != count or not valid:
        _refuse(environ, variable, expected)
    return numbers


def _refuse(environ: Mapping[str, str], variable: str, expected: str) -> None:
    raise ShardwiseError(
        f"{variable}={environ.get(variable)!r}: expected {expected}; fix or unset it (a testing "
        "aid)"
    )
