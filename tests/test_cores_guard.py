"""More ranks than cores: a warning line; far more: refused before any worker starts."""

from __future__ import annotations

import pytest

from shardwise.errors import ShardwiseError
from shardwise.preflight import MAX_RANKS_PER_CORE, check_cores


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})


def test_ranks_within_the_cores_say_nothing(two_cores) -> None:
    assert check_cores(2, derived=False) is None


def test_more_ranks_than_cores_warn_in_one_line(two_cores) -> None:
    warning = check_cores(3, derived=False) or ""
    assert "\n" not in warning and warning.startswith("3 processes on 2 CPU core(s)")


def test_far_more_ranks_than_cores_are_refused_naming_what_fits(two_cores) -> None:
    with pytest.raises(ShardwiseError, match=r"--nproc 64\).*use --nproc 2 or fewer") as refused:
        check_cores(64, derived=False)
    assert "\n" not in str(refused.value)
    assert check_cores(2 * MAX_RANKS_PER_CORE, derived=True)  # at the limit: a warning only
