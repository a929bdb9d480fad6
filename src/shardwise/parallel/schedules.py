"""Pipeline schedules as objects: what each needs, holds in flight and leaves idle.

    schedule = pipeline_schedule("1f1b")
    schedule.check(microbatches=4, stages=2)      # ShardwiseError when it cannot run
    schedule.in_flight(microbatches=8, stages=4, stage=0)   # 4 activations held at peak
    schedule.bubble(microbatches=8, stages=4)     # 0.27: the idle share, (K-1)/(M+K-1)

Everything that depends on the schedule (the check, the cut planner's memory, torch's schedule
class, how many stages a rank holds) asks its `Schedule` rather than comparing names, so that a
schedule with several stages per rank (interleaved, zero-bubble, V) is one more entry whose
numbers are its own, not a one-line addition every reader would get wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.errors import ShardwiseError


@dataclass(frozen=True)
class Schedule:
    """One pipeline schedule: torch's class for it and its costs, with one stage per rank."""

    name: str
    torch_class: str  # in torch.distributed.pipelining
    # 1F1B's warm-up sends one micro-batch into each stage before the first backward.
    needs_a_microbatch_per_stage: bool
    stages_per_rank: int = 1

    def stage_count(self, ranks: int) -> int:
        """Stages the model is cut into over `ranks` pipeline ranks.

        >>> pipeline_schedule("1f1b").stage_count(4)
        4
        """
        return ranks * self.stages_per_rank

    def stages_of(self, rank: int, ranks: int) -> tuple[int, ...]:
        """The stages pipeline rank `rank` of `ranks` holds, in the order it runs them: one per
        loop round the ranks (an interleaved schedule with 2 a rank: rank and rank + ranks).

        >>> pipeline_schedule("gpipe").stages_of(1, 4)
        (1,)
        """
        return tuple(rank + loop * ranks for loop in range(self.stages_per_rank))

    def check(self, microbatches: int, stages: int) -> None:
        """Raise `ShardwiseError` when this schedule cannot run `microbatches` over `stages`.

        >>> pipeline_schedule("gpipe").check(microbatches=1, stages=4)
        """
        if microbatches < 1:
            raise ShardwiseError(f"--microbatches {microbatches}: use at least 1")
        if self.needs_a_microbatch_per_stage and microbatches < stages:
            raise ShardwiseError(
                f"--schedule {self.name} needs at least as many micro-batches as stages; got "
                f"--microbatches {microbatches} for --pp {stages}: raise --microbatches to "
                f"{stages} or use --schedule gpipe"
            )

    def in_flight(self, microbatches: int, stages: int, stage: int) -> int:
        """Micro-batches whose activations `stage` holds at once, at its peak.

        >>> pipeline_schedule("1f1b").in_flight(microbatches=8, stages=4, stage=3)
        1
        """
        if self.needs_a_microbatch_per_stage:  # 1F1B: the warm-up depth, then one in one out
            return min(microbatches, stages - stage)
        return microbatches  # GPipe: every forward before any backward

    def bubble(self, microbatches: int, stages: int) -> float:
        """The share of a step each stage idles, (K-1)/(M+K-1) for K stages and M micro-batches.

        >>> round(pipeline_schedule("gpipe").bubble(microbatches=4, stages=2), 2)
        0.2
        """
        return (stages - 1) / (microbatches + stages - 1)


SCHEDULES = {
    "gpipe": Schedule("gpipe", "ScheduleGPipe", needs_a_microbatch_per_stage=False),
    "1f1b": Schedule("1f1b", "Schedule1F1B", needs_a_microbatch_per_stage=True),
}


def pipeline_schedule(name: str) -> Schedule:
    """The schedule called `name`; one line naming the choices for any other.

    >>> pipeline_schedule("1f1b").torch_class
    'Schedule1F1B'
    """
    if name not in SCHEDULES:
        raise ShardwiseError(f"--schedule {name}: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
