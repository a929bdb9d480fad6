"""The one helper that shortens any error to a line."""

from __future__ import annotations

from shardwise.errors import first_line


def test_first_line_keeps_the_first_non_blank_line() -> None:
    assert first_line(RuntimeError("\n  size mismatch  \n  at layer 3")) == "size mismatch"


def test_first_line_can_name_the_type() -> None:
    assert first_line(ValueError("bad width"), with_type=True) == "ValueError: bad width"


def test_an_error_without_a_message_is_named_by_its_type() -> None:
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert first_line(KeyboardInterrupt(), with_type=True) == "KeyboardInterrupt"


def test_first_line_of_a_recorded_message() -> None:
    assert first_line("TypeError: forward() got 3 arguments\nmore") == (
        "TypeError: forward() got 3 arguments"
    )


def test_whole_joins_a_short_message_onto_one_line() -> None:
    assert first_line(ValueError("bad\nwidth"), with_type=True, whole=True) == (
        "ValueError: bad width"
    )
