"""least_conn: the backend with the fewest in-flight requests relative to its weight.

Each request goes to a backend with the lowest ``in_flight / effective weight`` (counts
from ``snapshot.stats``).  Ties are broken at random in proportion to effective weight,
so an idle cluster splits traffic by weight instead of sending it all to the first
backend, and equal weights give a uniform choice among the least loaded.

The counts change on every request, outside the policy, so the picker offers two modes:

* **scan** (what a picker does until told otherwise): every pick reads every
  backend's count — exact, needs nothing from the caller, O(n) per pick: about a
  microsecond at 10 backends, tens at 1,000.  Like nginx, and Envoy's ``FULL_SCAN``.
* **indexed**: the caller reports each change with :meth:`LeastConnPicker.load_changed`
  and the picker keeps backends bucketed by count within each class of equal effective
  weight (as HAProxy repositions a server in its tree on every connection change).  A
  pick is then O(number of weight classes) — O(1) with equal weights — and a report is
  O(1) amortized.  The first report switches the picker to this mode for good.

The caller's contract for the indexed mode is in :meth:`LeastConnPicker.load_changed`.
Supports ``slow_start`` (see :mod:`.slow_start`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter, truediv

from poise.core.backend import Backend, BackendStats
from poise.core.clock import Clock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies.slow_start import Ramp, RampedPolicy, Ramping

_in_flight = attrgetter("in_flight")


class LeastConn(RampedPolicy):
    """Policy ``least_conn``.  Options: ``slow_start`` (seconds or a duration such as
    ``"30s"``; default 0 = off)."""

    def build(self, snapshot: ClusterSnapshot) -> LeastConnPicker:
        return LeastConnPicker(snapshot, self._ramp(snapshot), self._rng, self._clock)

    def __repr__(self) -> str:
        return f"<LeastConn slow_start={self.slow_start:g}s>"


class LeastConnPicker(Ramping):
    """Least ``in_flight / weight`` over one snapshot's backends (scan or indexed mode)."""

    __slots__ = ("_backends", "_stats", "_n", "_weights", "_uniform", "_random",
                 "_position", "_index")

    def __init__(self, snapshot: ClusterSnapshot, ramp: Ramp | None, rng: random.Random,
                 clock: Clock) -> None:
        backends = self._backends = snapshot.backends
        self._stats: tuple[BackendStats, ...] = tuple(snapshot.stats[b] for b in backends)
        self._n = len(backends)
        self._random = rng.random
        self._position = {b: i for i, b in enumerate(backends)}
        self._index: _LoadIndex | None = None
        self._apply(self._start_ramp(ramp, clock) or tuple(b.weight for b in backends))

    def _apply(self, weights: Sequence[float]) -> None:
        self._weights = weights
        self._uniform = not weights or min(weights) == max(weights)
        if self._index is not None:
            self._index.reweigh(weights)

    # -- the caller's side of the indexed mode ---------------------------------------------

    def load_changed(self, backend: Backend) -> None:
        """Report that ``snapshot.stats[backend].in_flight`` has changed.

        Optional; the first call switches this picker from scan to indexed mode (it reads
        every count once, so nothing before it needs reporting).  From then on the caller
        must call it after **every** change of the in-flight count of any backend of this
        picker's snapshot — increments and decrements, including moving a request to
        another backend (report both) — before the next ``pick``/``candidates``.  The
        new count is read from the stats, so one call after several changes to the same
        backend is enough.  Backends not in the snapshot are ignored, so the caller may
        report a request that started under an older picker to the current one.
        A change never reported leaves that backend's position stale until its next
        report; :meth:`drift` lists such backends (for tests).
        """
        i = self._position.get(backend)
        if i is None:
            return
        index = self._index
        if index is None:
            self._index = self._build_index()
        else:
            index.move(i, self._stats[i].in_flight)

    @property
    def indexed(self) -> bool:
        """True once the caller has reported a change (see :meth:`load_changed`)."""
        return self._index is not None

    def drift(self) -> list[Backend]:
        """Backends whose in-flight count differs from what the index holds: changes the
        caller did not report.  Always empty in scan mode."""
        index = self._index
        if index is None:
            return []
        return [b for b, s, level in zip(self._backends, self._stats, index.level, strict=True)
                if s.in_flight != level]

    def _build_index(self) -> _LoadIndex:
        # Backends ramping from different moments have different effective weights at
        # any time, so a class is (weight, ramp start); it never needs splitting later.
        starts = self._ramp.starts if self._ramp is not None else {}
        classes: dict[tuple[int, float | None], list[int]] = {}
        for i, b in enumerate(self._backends):
            classes.setdefault((b.weight, starts.get(i)), []).append(i)
        return _LoadIndex([s.in_flight for s in self._stats], list(classes.values()),
                          self._weights)

    # -- picking -----------------------------------------------------------------------------

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        if self._ramp is not None:
            self._follow_ramp()
        index = self._index
        if index is not None:
            return self._backends[index.least(self._random)]
        return self._backends[self._scan()]

    def _scan(self) -> int:
        stats = self._stats
        if self._uniform:
            loads = list(map(_in_flight, stats))
            low = min(loads)
            i = loads.index(low)
            ties = loads.count(low)
            if ties > 1:
                for _ in range(int(self._random() * ties)):
                    i = loads.index(low, i + 1)
            return i
        weights = self._weights
        # Division, not multiplication by 1/w: a correctly rounded quotient makes equal
        # ratios (1/2, 2/4) equal floats, so ties are seen as ties.
        keys = list(map(truediv, map(_in_flight, stats), weights))
        low = min(keys)
        i = chosen = keys.index(low)
        ties = keys.count(low)
        if ties > 1:
            # Weighted reservoir sampling over the tied backends: each wins with
            # probability weight / (sum of tied weights).
            rnd = self._random
            total = weights[i]
            for _ in range(ties - 1):
                i = keys.index(low, i + 1)
                total += weights[i]
                if rnd() * total < weights[i]:
                    chosen = i
        return chosen

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        """The pick, then every other backend from least to most loaded (relative to
        weight), so a caller skipping unready backends gets the least loaded ready one."""
        if not self._n:
            return
        if self._ramp is not None:
            self._follow_ramp()
        backends = self._backends
        index = self._index
        if index is not None:
            first = index.least(self._random)
            yield backends[first]
            for i in index.ordered(first, self._random):
                yield backends[i]
            return
        first = self._scan()
        yield backends[first]
        stats, weights, rnd = self._stats, self._weights, self._random
        # Ties in a weighted random order: the smallest of exponential variates with
        # rates w_i is backend i's with probability w_i / sum(w).
        rest = [(stats[i].in_flight / weights[i], -math.log(1.0 - rnd()) / weights[i], i)
                for i in range(self._n) if i != first]
        heapq.heapify(rest)
        while rest:
            yield backends[heapq.heappop(rest)[2]]

    def __repr__(self) -> str:
        mode = "indexed" if self._index is not None else "scan"
        ramping = f" ramping={self.ramping}" if self._ramp is not None else ""
        return f"<LeastConnPicker backends={self._n} mode={mode}{ramping}>"


class _WeightClass:
    """Backends of equal effective weight, bucketed by in-flight count."""

    __slots__ = ("weight", "member", "size", "buckets", "low")

    def __init__(self, weight: float, members: list[int]) -> None:
        self.weight = weight
        self.member = members[0]        # any one member: where its weight is read
        self.size = len(members)
        self.buckets: dict[int, list[int]] = {}
        self.low = 0                    # smallest count with a non-empty bucket


class _LoadIndex:
    """Where each backend stands: its class, its count and its slot in that bucket.

    Buckets are unordered lists with O(1) removal (the last element fills the gap), and
    a class's lowest count only ever moves by as much as some backend's count moved, so
    keeping it is O(1) amortized per reported change.
    """

    __slots__ = ("classes", "class_of", "level", "slot", "version")

    def __init__(self, loads: list[int], classes: list[list[int]],
                 weights: Sequence[float]) -> None:
        self.level = loads
        self.slot = [0] * len(loads)
        self.class_of = [0] * len(loads)
        self.classes: list[_WeightClass] = []
        self.version = 0                # bumped by every move, to detect stale iterators
        for ci, members in enumerate(classes):
            cls = _WeightClass(weights[members[0]], members)
            for i in members:
                self.class_of[i] = ci
                bucket = cls.buckets.setdefault(loads[i], [])
                self.slot[i] = len(bucket)
                bucket.append(i)
            cls.low = min(cls.buckets)
            self.classes.append(cls)

    def reweigh(self, weights: Sequence[float]) -> None:
        for cls in self.classes:
            cls.weight = weights[cls.member]

    def move(self, i: int, load: int) -> None:
        old = self.level[i]
        if load == old:
            return
        self.version += 1
        cls = self.classes[self.class_of[i]]
        buckets = cls.buckets
        bucket = buckets[old]
        last = bucket.pop()
        if last != i:
            slot = self.slot[i]
            bucket[slot] = last
            self.slot[last] = slot
        if not bucket:
            del buckets[old]
        new = buckets.get(load)
        if new is None:
            new = buckets[load] = []
        self.slot[i] = len(new)
        new.append(i)
        self.level[i] = load
        if load < cls.low:
            cls.low = load
        elif old == cls.low and not bucket:
            low = old + 1
            while low not in buckets:   # stops at `load` at the latest
                low += 1
            cls.low = low

    def least(self, random: Callable[[], float]) -> int:
        """A backend of lowest ``count / weight``; ties weighted by effective weight."""
        classes = self.classes
        cls = classes[0]
        if len(classes) > 1:
            best = math.inf
            total = 0.0
            for c in classes:
                key = c.low / c.weight
                if key > best:
                    continue
                # Weighted reservoir sampling over the tied classes, in one pass: each
                # class's chance is its weight times its number of least-loaded backends.
                mass = c.weight * len(c.buckets[c.low])
                if key < best:
                    best, cls, total = key, c, mass
                else:
                    total += mass
                    if random() * total < mass:
                        cls = c
        bucket = cls.buckets[cls.low]
        return bucket[int(random() * len(bucket))]

    def ordered(self, first: int, random: Callable[[], float]) -> Iterator[int]:
        """Every backend but ``first``, by ascending ``count / weight`` (equal ones in a
        random rotation).  Lazy: it reaches a bucket only when the caller has taken
        everything before it.  If the index changes while the caller holds the iterator,
        the rest is recomputed from the index as it is then."""
        version = self.version
        classes = self.classes
        seen = {first}
        # One entry per class: its lowest bucket not yet walked.
        heap = [(cls.low / cls.weight, random(), ci, cls.low) for ci, cls in enumerate(classes)]
        heapq.heapify(heap)
        left = [cls.size for cls in classes]
        while heap and self.version == version:
            _, _, ci, level = heapq.heappop(heap)
            cls = classes[ci]
            bucket = cls.buckets[level]
            size = len(bucket)
            left[ci] -= size
            if left[ci]:
                following = _next_level(cls.buckets, level)
                heapq.heappush(heap, (following / cls.weight, random(), ci, following))
            start = int(random() * size)
            for k in range(size):
                i = bucket[(start + k) % size]
                if i not in seen:
                    seen.add(i)
                    yield i
                    if self.version != version:
                        break
        if self.version == version:
            return
        level, class_of = self.level, self.class_of
        rest = sorted((level[i] / classes[class_of[i]].weight, random(), i)
                      for i in range(len(level)) if i not in seen)
        for _, _, i in rest:
            yield i


def _next_level(buckets: dict[int, list[int]], level: int) -> int:
    """The lowest count above ``level`` with a bucket (one must exist)."""
    for following in range(level + 1, level + 9):   # counts are usually dense
        if following in buckets:
            return following
    return min(k for k in buckets if k > level)
