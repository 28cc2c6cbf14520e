"""The suite runner's exit status: a failure or an empty session is never reported as success."""

from __future__ import annotations

from run_all import combined_status


def test_both_sessions_passing_is_success():
    assert combined_status([0, 0]) == 0


def test_a_failing_session_fails_the_run():
    assert combined_status([0, 1]) == 1
    assert combined_status([2, 0]) == 2
    assert combined_status([5, 1]) == 1


def test_a_session_that_collected_nothing_fails_the_run():
    assert combined_status([0, 5]) == 5
    assert combined_status([5, 5]) == 5
