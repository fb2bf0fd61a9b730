"""A worker's wait in a forming gang: hold the seat, move to an earlier gang, give up in time.

The rules live in ``shared.services.gangs``; this loop only applies them from the worker's side,
polling the database (no broker round trip, no peer-to-peer talk before the rendezvous):

- the seat's lease is renewed at every poll, so a worker that dies while waiting loses its seat
  after one lease and the gang does not wait for it;
- when an earlier forming gang in the gang order fits this worker, it leaves its seat and joins
  that one (two half-filled gangs never hold every worker);
- after ``LORAFLEET_GANG_WAIT_SECONDS`` without the gang filling, the seat is given back; the
  caller then takes other work once (the job stays queued, its next token brings workers back);
- a draining worker gives its seat back at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import OperationalError

from shared.config import Settings
from shared.db import session_scope
from shared.services import gangs
from shared.services.gangs import FORMING, GangPlan, NodeOffer, Seat
from worker import fleet

log = logging.getLogger("lorafleet.gang")


@dataclass
class GangWait:
    """Wait for ``seat``'s gang to start; :meth:`run` returns its plan, or None (seat given up;
    ``gave_up`` then names the jobs not to rejoin before taking other work)."""

    seat: Seat
    offer: NodeOffer
    settings: Settings
    skip: set[str] = field(default_factory=set)
    gave_up: set[str] = field(default_factory=set)
    poll_seconds: float = 0.5
    clock: Callable[[], float] = time.monotonic

    def run(self) -> GangPlan | None:
        lease_s = self.settings.lease_seconds
        period = min(self.poll_seconds, lease_s / 4)
        deadline = self.clock() + self.settings.gang_wait_seconds
        while True:
            try:
                with session_scope() as session:
                    state = gangs.poll(session, self.seat, lease_s)
            except OperationalError as exc:  # busy or briefly unreachable: the seat lease waits
                log.warning("gang poll failed, retrying: %s", str(exc).splitlines()[0])
                if self.clock() > deadline:
                    return None
                time.sleep(period)
                continue
            if isinstance(state, GangPlan):
                return state
            if state != FORMING:
                log.info("gang of %s: seat gone", self.seat.job_id)
                self._leave()
                return None
            if fleet.draining.is_set():
                return self._give_up("worker draining")
            if self.clock() > deadline:
                self.gave_up.add(self.seat.job_id)
                return self._give_up(f"not full after {self.settings.gang_wait_seconds:.0f} s")
            try:
                self._move_earlier()
            except OperationalError as exc:
                log.warning("looking for an earlier gang failed: %s", str(exc).splitlines()[0])
            time.sleep(period)

    def _move_earlier(self) -> None:
        """Leave for the earliest forming gang before ours that fits, if there is one."""
        capacity = fleet.routing_capacity()
        with session_scope() as session:
            ahead = gangs.earlier_forming(session, self.seat, capacity, self.skip)
        if not ahead or not self._leave():
            return
        for job_id in ahead:
            with session_scope() as session:
                seat = gangs.join(
                    session, job_id, self.seat.worker_id, self.offer, self.settings.lease_seconds
                )
            if seat is not None:
                log.info("left the gang of %s for the earlier %s", self.seat.job_id, job_id)
                self.seat = seat
                fleet.set_current_job(seat.job_id)
                return
        # The earlier gangs filled or went meanwhile: back to ours, if it still forms.
        with session_scope() as session:
            seat = gangs.join(
                session,
                self.seat.job_id,
                self.seat.worker_id,
                self.offer,
                self.settings.lease_seconds,
            )
        if seat is not None:
            self.seat = seat

    def _leave(self) -> bool:
        with session_scope() as session:
            return gangs.leave(session, self.seat)

    def _give_up(self, why: str) -> GangPlan | None:
        if self._leave():
            log.info("gave up the seat in the gang of %s: %s", self.seat.job_id, why)
            return None
        # The gang started with our seat while we decided: run it.
        with session_scope() as session:
            state = gangs.poll(session, self.seat, self.settings.lease_seconds)
        return state if isinstance(state, GangPlan) else None
