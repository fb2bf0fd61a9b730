"""The job state machine."""

from __future__ import annotations

import pytest

from shared.errors import Conflict
from shared.states import ALLOWED, FINAL, can_transition, check_transition


def test_final_states_have_no_exit() -> None:
    for state in FINAL:
        assert ALLOWED[state] == frozenset()
        with pytest.raises(Conflict):
            check_transition(state, "running")


def test_allowed_and_refused() -> None:
    check_transition("queued", "running")
    check_transition("running", "queued")  # requeue after a lost worker
    assert not can_transition("queued", "succeeded")
    assert not can_transition("bogus", "running")
    with pytest.raises(Conflict):
        check_transition("queued", "succeeded")
