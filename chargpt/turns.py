"""Turns at the model: how a server shares its cores among the generations clients ask for.

A few generations compute at once (slots); the rest wait in a first-in, first-out queue of
bounded length, each able to ask how many are ahead of it, and leave when its client goes.
A slot that frees goes to the first in the queue at once, so that a newcomer never overtakes
one that waits. Safe to share between a server's threads; nothing here knows about HTTP.

    turns = Turns(slots=2, max_waiting=64)
    ticket = turns.join()                 # None: the queue is full
    while not ticket.started:
        ahead = turns.wait(ticket, 0.25)  # the number ahead of it, once it changes or the time is up
    ...                                   # generate
    turns.leave(ticket)                   # its slot to the next, or its place in the queue
"""

import math
import threading
import time
from collections import deque


class Ticket:
    """One generation's place: waiting, then started (it holds a slot), then left."""

    __slots__ = ("started", "left", "since")

    def __init__(self):
        self.started, self.left, self.since = False, False, None


class Turns:
    def __init__(self, slots, max_waiting):
        assert slots >= 1 and max_waiting >= 0
        self.slots, self.max_waiting = slots, max_waiting
        self.changed = threading.Condition()  # notified whenever a slot or a place in the queue frees
        self.running = 0  # tickets holding a slot now
        self.waiting = deque()  # tickets in the order they came
        self.seconds = deque(maxlen=16)  # how long the last generations held their slot: Retry-After's estimate

    def join(self):
        """A new ticket, started at once where a slot is free and no one waits; else at the
        end of the queue; None where the queue is full."""
        ticket = Ticket()
        with self.changed:
            must_wait = self.running >= self.slots or self.waiting
            if must_wait and len(self.waiting) >= self.max_waiting:
                return None
            self.waiting.append(ticket)
            self._promote()
        return ticket

    def _promote(self):
        """Free slots to the first in the queue (the lock held)."""
        while self.waiting and self.running < self.slots:
            first = self.waiting.popleft()
            first.started, first.since = True, time.monotonic()
            self.running += 1
        self.changed.notify_all()

    def ahead(self, ticket):
        """How many wait before ticket (0: it is next); 0 once it has started."""
        with self.changed:
            return 0 if ticket.started else self.waiting.index(ticket)

    def wait(self, ticket, seconds):
        """Block until ticket starts, its place in the queue changes, or seconds pass; then
        the number ahead of it (0 once it has started)."""
        with self.changed:
            if not ticket.started:
                before = self.waiting.index(ticket)
                self.changed.wait_for(lambda: ticket.started or self.waiting.index(ticket) != before, seconds)
            return 0 if ticket.started else self.waiting.index(ticket)

    def leave(self, ticket):
        """ticket's client is done, or gone: its slot to the next in the queue, or its place to
        those behind it. Leaving twice is leaving once."""
        with self.changed:
            if ticket.left:
                return
            ticket.left = True
            if ticket.started:
                self.running -= 1
                self.seconds.append(time.monotonic() - ticket.since)
            else:
                self.waiting.remove(ticket)
            self._promote()

    def retry_after(self):
        """Seconds until a place in a full queue is likely to free: the last generations' mean
        time over the slots (each one that ends lets one in), from 1 to 60."""
        with self.changed:
            mean = sum(self.seconds) / len(self.seconds) if self.seconds else 1.0
        return min(60, max(1, math.ceil(mean / self.slots)))

    def counts(self):
        """{"computing": generations holding a slot, "waiting": those in the queue}."""
        with self.changed:
            return {"computing": self.running, "waiting": len(self.waiting)}
