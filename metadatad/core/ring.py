"""Consistent-hash ring from node uuids to live conductors (pure: no I/O, no clock).

Every conductor that sees the same membership computes the same ring, whatever order
the names arrive in, so the ring is a function of the *set* of live conductor names.

How a node finds its conductor
------------------------------
The hash circle is cut into 2**18 slots.  Each conductor puts ``points`` points
(default 3072, ``[conductor] ring_points``) into slots; the slots and a 64-bit seed
come from SHAKE-256 of the conductor's name and of nothing else.  A node uuid hashes
(BLAKE2b, 64 bits) to a slot.  Conductors are ranked for that node by:

1. the circular distance, in slots and in either direction, from the node's slot to the
   conductor's nearest point (smaller first), then
2. the side of that point: clockwise before counterclockwise (this only separates the
   two sides of a gap's exact middle), then
3. a rendezvous weight ``splitmix64(node_hash ^ conductor_seed)`` (larger first), then
4. the name (smaller first; only on a 64-bit weight collision).

The owner is the first conductor, the standbys the next ones.  A conductor's rank key
depends only on the node and its own name, so removing a conductor moves exactly its
own nodes, adding one moves nodes only to it, and a node's standbys keep their order.

Why this shape (numbers in docs/benchmarks-ring.md, from bench/ring.py):

* A plain ring ("next point clockwise", tooz/Ironic) gives each point the arc before it,
  and arc lengths vary by 100 %; with 32 points per conductor the busiest conductor
  carries 1.1-1.6x the mean.  Taking the nearest point in *either* direction gives a
  point half of each neighbouring gap, which halves that variance.
* With many conductors most slots hold several conductors' points; splitting such a
  slot by rendezvous hashing of each node, rather than by finer arcs, shares it evenly
  per node.  Together these keep the busiest/mean within a percent or so of an ideal
  uniform hash (the floor no consistent scheme beats), while staying minimally
  disruptive, which Maglev-style tables are not.
* All slots are resolved when the ring is built (2**18 entries), so a lookup is one
  hash, one list index and, only for shared slots, a few integer mixes: its cost does
  not grow with the number of conductors (plain rendezvous hashing is O(conductors)).

Empty membership: ``owner``, ``assign`` and ``assign_bounded`` raise
:class:`EmptyRingError` (an empty ring has no answer, and silently returning ``None``
would let a caller push a DHCP mapping to nobody); ``owners`` returns ``()``, and
:func:`diff` reports ``None`` for the side whose ring is empty.

Node uuids are used exactly as given (no case folding): pass the canonical form.
"""

from __future__ import annotations

import hashlib
import math
import operator
import sys
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator
from fractions import Fraction
from itertools import compress
from typing import Any, Final, NamedTuple, NoReturn, TypeAlias

__all__ = [
    "DEFAULT_POINTS",
    "MAX_POINTS",
    "EmptyRingError",
    "HashRing",
    "diff",
]

# 2**18 slots: at 100 conductors x 3072 points a slot holds 1.2 points on average, so
# few lookups need rendezvous mixes; 2**16 slots made lookups at 50-100 conductors
# about 1.5x slower (several candidates per slot), for a smaller table.
_SLOT_BITS: Final = 18
_SLOTS: Final = 1 << _SLOT_BITS
_SHIFT: Final = 64 - _SLOT_BITS
_POINT_SHIFT: Final = 32 - _SLOT_BITS
_M64: Final = (1 << 64) - 1
# Changing the domain string, the slot count or the hashes remaps every node: all
# conductors of a cluster must run the same ring version (as Ironic requires for
# hash_ring_algorithm).
_DOMAIN: Final = b"metadatad.ring.v1\x00"

DEFAULT_POINTS: Final = 3072
"""Points per conductor.  Busiest/mean comes within about 1 % of the ideal uniform hash
at 3-100 conductors (2048 points: 1.7 % at 50 conductors); building costs time in
proportion to conductors x points (bench/ring.py prints it)."""
MAX_POINTS: Final = 1 << 16

# Points are read as little-endian 32-bit integers on every platform (their top
# _SLOT_BITS bits are the slot), so a mixed big/little-endian cluster still agrees.
assert array("I").itemsize == 4
_SWAP: Final = sys.byteorder == "big"

# A slot's entry: its only candidate's name, or a slice of the ring's flat tuple of
# (seed, name) candidates sorted by name.  The str case is the common one and costs a
# single type check per lookup.
_Candidates: TypeAlias = tuple[tuple[int, str], ...]
_Entry: TypeAlias = str | slice


class EmptyRingError(LookupError):
    """Raised when a node is looked up in a ring without any conductor."""


_blake2b: Final = hashlib.blake2b  # module globals: cheaper than attribute lookups
_from_bytes: Final = int.from_bytes


def _utf8(text: str) -> bytes:
    # surrogatepass gives bytes to every str, lone surrogates included; for any other
    # str they are exactly its UTF-8.
    return text.encode("utf-8", "surrogatepass")


def _key_hash(node_uuid: str) -> int:
    if not isinstance(node_uuid, str):
        raise TypeError(f"node uuid must be a str, not {type(node_uuid).__name__}")
    return _from_bytes(_blake2b(_utf8(node_uuid), digest_size=8).digest(), "little")


def _hash_all(node_uuids: Iterable[str]) -> dict[str, int]:
    """``{node_uuid: key hash}``, as _key_hash() computes them but in bulk."""
    hashes: dict[str, int] = {}
    for node in node_uuids:
        try:
            data = node.encode()
        except UnicodeEncodeError:
            data = _utf8(node)
        except AttributeError:
            _key_hash(node)  # raises the TypeError
            raise
        hashes[node] = _from_bytes(_blake2b(data, digest_size=8).digest(), "little")
    return hashes


def _weight(key_hash: int, seed: int) -> int:
    """Rendezvous weight of one conductor for one node: splitmix64's finaliser."""
    x = key_hash ^ seed
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


def _pick(key_hash: int, candidates: _Candidates) -> str:
    """The highest-weight candidate; candidates are sorted by name, so ties go to the
    smaller name, as in :meth:`HashRing.owners`."""
    best = ""
    best_weight = -1
    for seed, name in candidates:
        # _weight() inlined: this loop is the only per-conductor work of a lookup.
        x = key_hash ^ seed
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
        x ^= x >> 31
        if x > best_weight:
            best_weight = x
            best = name
    return best


def _positive_int(value: object, what: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 1 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{what} must be at least 1{bound}, got {value}")
    return value


def _load_factor(value: object) -> Fraction:
    # Exact arithmetic, so that ceil(factor * mean) is the same integer on every
    # conductor and 1.05 means 21/20, not the float just above it.
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise TypeError(f"max_load_factor must be a number, not {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"max_load_factor must be finite, got {value}")
        value = Fraction(repr(value))
    factor = Fraction(value)
    if factor < 1:
        raise ValueError(f"max_load_factor must be at least 1, got {value}")
    return factor


class HashRing:
    """An immutable consistent-hash ring over a set of conductor names.

    ``HashRing(conductors, replicas=1, points=DEFAULT_POINTS)``: *conductors* is any
    iterable of non-empty names (order and duplicates do not matter); *replicas* is how
    many conductors :meth:`owners` returns by default (owner plus standbys); *points*
    is the number of points per conductor and must be the same on every conductor.
    """

    __slots__ = ("_by_name", "_flat", "_names", "_occupied", "_points", "_replicas", "_table")

    _names: tuple[str, ...]
    _replicas: int
    _points: int
    _table: list[_Entry]
    _occupied: list[int]
    _flat: _Candidates
    _by_name: dict[str, tuple[int, str]]

    def __init__(
        self,
        conductors: Iterable[str],
        replicas: int = 1,
        points: int = DEFAULT_POINTS,
    ) -> None:
        if isinstance(conductors, str | bytes):
            raise TypeError("conductors must be an iterable of names, not a single string")
        unique = set(conductors)
        for name in unique:
            if not isinstance(name, str):
                raise TypeError(f"conductor names must be str, not {type(name).__name__}")
            if not name:
                raise ValueError("conductor names must not be empty")
        names = tuple(sorted(unique))
        set_ = object.__setattr__
        set_(self, "_names", names)
        set_(self, "_replicas", _positive_int(replicas, "replicas"))
        set_(self, "_points", _positive_int(points, "points", MAX_POINTS))
        layout = _build(names, points)
        set_(self, "_table", layout.table)
        set_(self, "_occupied", layout.occupied)
        set_(self, "_flat", layout.flat)
        set_(self, "_by_name", layout.by_name)

    # -- immutability and value semantics ---------------------------------------------

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._names, self._replicas, self._points))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return (self._names, self._replicas, self._points) == (
            other._names,
            other._replicas,
            other._points,
        )

    def __hash__(self) -> int:
        return hash((self._names, self._replicas, self._points))

    def __repr__(self) -> str:
        return f"HashRing({list(self._names)!r}, replicas={self._replicas}, points={self._points})"

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, conductor: object) -> bool:
        return conductor in self._by_name

    # -- properties --------------------------------------------------------------------

    @property
    def conductors(self) -> tuple[str, ...]:
        """The member names, sorted."""
        return self._names

    @property
    def replicas(self) -> int:
        """How many conductors :meth:`owners` returns by default."""
        return self._replicas

    @property
    def points(self) -> int:
        """Points per conductor."""
        return self._points

    def without(self, *conductors: str) -> HashRing:
        """The ring left if *conductors* failed (names not in the ring are ignored)."""
        gone = set(conductors)
        return HashRing(
            (name for name in self._names if name not in gone), self._replicas, self._points
        )

    # -- lookups -----------------------------------------------------------------------

    def owner(self, node_uuid: str) -> str:
        """The conductor owning *node_uuid*; :class:`EmptyRingError` if there is none."""
        # _key_hash() inlined: this runs for every metadata request and TFTP session.
        try:
            data = node_uuid.encode()
        except UnicodeEncodeError:
            data = _utf8(node_uuid)  # lone surrogates: same bytes as _key_hash()
        except AttributeError:
            _key_hash(node_uuid)  # raises the TypeError
            raise
        key_hash = _from_bytes(_blake2b(data, digest_size=8).digest(), "little")
        table = self._table
        if not table:
            raise EmptyRingError("no live conductor in the ring")
        entry = table[key_hash >> _SHIFT]
        if isinstance(entry, str):
            return entry
        return _pick(key_hash, self._flat[entry])

    def owners(self, node_uuid: str, replicas: int | None = None) -> tuple[str, ...]:
        """Owner first, then standbys in takeover order: ``min(replicas, len(ring))``
        distinct names (*replicas* defaults to the ring's); ``()`` for an empty ring."""
        count = self._replicas if replicas is None else _positive_int(replicas, "replicas")
        key_hash = _key_hash(node_uuid)
        want = min(count, len(self._names))
        found: list[str] = []
        if want:
            for name in self._preference(key_hash):
                found.append(name)
                if len(found) == want:
                    break
        return tuple(found)

    def assign(self, node_uuids: Iterable[str]) -> dict[str, str]:
        """``{node_uuid: owner}`` for every node, computed in bulk."""
        table = self._table
        result: dict[str, str] = {}
        if not table:
            for node in node_uuids:
                _key_hash(node)  # a wrong type is still a TypeError
                raise EmptyRingError("no live conductor in the ring")
            return result
        # owner() inlined, with the names bound locally: this loop is the full remap.
        flat = self._flat
        blake2b = _blake2b
        from_bytes = _from_bytes
        shift = _SHIFT
        for node in node_uuids:
            try:
                data = node.encode()
            except UnicodeEncodeError:
                data = _utf8(node)  # lone surrogates: same bytes as _key_hash()
            except AttributeError:
                _key_hash(node)  # raises the TypeError
                raise
            key_hash = from_bytes(blake2b(data, digest_size=8).digest(), "little")
            entry = table[key_hash >> shift]
            result[node] = entry if isinstance(entry, str) else _pick(key_hash, flat[entry])
        return result

    def assign_bounded(self, node_uuids: Iterable[str], max_load_factor: float) -> dict[str, str]:
        """``{node_uuid: conductor}`` with no conductor above ``ceil(max_load_factor *
        nodes / conductors)`` nodes ("Consistent Hashing with Bounded Loads", Mirrokni,
        Thorup and Zadimoghaddam).

        Nodes are placed one by one, each on the first conductor of its :meth:`owners`
        order that still has room.  They are taken in the order of their hash (then
        uuid), never in input order, so every conductor that knows the same node set and
        membership computes the same result.  *max_load_factor* must be at least 1;
        floats are read as their decimal text (1.05 is 21/20).
        """
        factor = _load_factor(max_load_factor)
        hashes = _hash_all(node_uuids)
        if not hashes:
            return {}
        names = self._names
        if not names:
            raise EmptyRingError("no live conductor in the ring")
        # ceil(factor * n / N) in integers: exact on every platform.
        cap = -(-(factor.numerator * len(hashes)) // (factor.denominator * len(names)))
        load = dict.fromkeys(names, 0)
        table = self._table
        result: dict[str, str] = {}
        for key_hash, node in sorted(zip(hashes.values(), hashes, strict=True)):
            entry = table[key_hash >> _SHIFT]
            chosen = entry if isinstance(entry, str) else _pick(key_hash, self._flat[entry])
            if load[chosen] >= cap:
                # cap * N >= n, so some conductor always has room.
                chosen = next(c for c in self._preference(key_hash) if load[c] < cap)
            load[chosen] += 1
            result[node] = chosen
        return result

    def _preference(self, key_hash: int) -> Iterator[str]:
        """Every conductor, in rank order for the node with *key_hash*.

        Walks the occupied slots outwards from the node's slot, on both sides at once,
        nearest first; each slot's new conductors come out by rendezvous weight.
        """
        occupied = self._occupied
        count = len(occupied)
        if not count:
            return
        total = len(self._by_name)
        slot = key_hash >> _SHIFT
        right = bisect_left(occupied, slot)  # walks up: occupied[right] >= slot
        left = right - 1  # walks down
        used = 0
        seen: set[str] = set()
        while used < count:
            right_slot = occupied[right % count]
            left_slot = occupied[left % count]
            right_distance = (right_slot - slot) % _SLOTS
            left_distance = (slot - left_slot) % _SLOTS
            groups: list[_Candidates] = []
            if right % count == left % count:  # the last slot: reached from both sides
                groups.append(self._members(right_slot))
                used += 1
            else:
                # Equally near on both sides: the slot above (clockwise) ranks first.
                if right_distance <= left_distance:
                    groups.append(self._members(right_slot))
                    right += 1
                    used += 1
                if left_distance <= right_distance:
                    groups.append(self._members(left_slot))
                    left -= 1
                    used += 1
            for group in groups:
                fresh = {name: seed for seed, name in group if name not in seen}
                ranked = sorted(fresh, key=lambda name: (-_weight(key_hash, fresh[name]), name))
                for name in ranked:
                    seen.add(name)
                    yield name
            if len(seen) == total:
                return

    def _members(self, slot: int) -> _Candidates:
        entry = self._table[slot]
        if isinstance(entry, str):
            return (self._by_name[entry],)
        return self._flat[entry]


class _Layout(NamedTuple):
    table: list[_Entry]  # per slot: the only candidate's name, or a slice of flat
    occupied: list[int]  # slots holding at least one point, ascending
    flat: _Candidates  # runs of (seed, name) candidates, each run sorted by name
    by_name: dict[str, tuple[int, str]]


def _build(names: tuple[str, ...], points: int) -> _Layout:
    """Resolve every slot to its candidates.

    Per-point work runs in C (``map``, ``compress``, ``sort`` over arrays and ints);
    Python-level loops only visit conductors and the gaps between occupied slots.  The
    cost grows with conductors x points: see the build column of the benchmark.
    """
    if not names:
        return _Layout([], [], (), {})
    seeds: list[int] = []
    slots_of: list[array[int]] = []
    for name in names:
        stream = hashlib.shake_256(_DOMAIN + _utf8(name)).digest(8 + 4 * points)
        seeds.append(int.from_bytes(stream[:8], "little"))
        values = array("I")
        values.frombytes(stream[8:])
        if _SWAP:
            values.byteswap()
        slots_of.append(array("I", map(_POINT_SHIFT.__rrshift__, values)))
    candidate = list(zip(seeds, names, strict=True))
    by_name = dict(zip(names, candidate, strict=True))

    # One code per point, slot in the high bits and conductor index in the low bits:
    # sorting groups each slot's conductors together, in name order.  A conductor with
    # two points in a slot is listed twice there, which changes no result.
    bits = max(1, (len(names) - 1).bit_length())
    scale = 1 << bits
    low = scale - 1
    code_list: list[int] = []
    for index, slots in enumerate(slots_of):
        code_list.extend(map(index.__or__, map(scale.__mul__, slots)))
    code_list.sort()
    slot_of = list(map(bits.__rrshift__, code_list))
    starts = [0, *compress(range(1, len(slot_of)), map(operator.ne, slot_of[1:], slot_of))]
    ends = [*starts[1:], len(slot_of)]
    occupied = list(map(slot_of.__getitem__, starts))
    flat = list(map(candidate.__getitem__, map(low.__and__, code_list)))

    # A slot with a single conductor holds its name (the common case, and the fastest
    # lookup); a shared slot holds the slice of flat listing its conductors.
    table: list[_Entry] = [""] * _SLOTS
    single = list(map((1).__eq__, map(operator.sub, ends, starts)))
    shared = list(map(operator.not_, single))
    deque(
        map(
            table.__setitem__,
            compress(occupied, shared),
            map(slice, compress(starts, shared), compress(ends, shared)),
        ),
        maxlen=0,
    )
    single_codes = map(code_list.__getitem__, compress(starts, single))
    deque(
        map(
            table.__setitem__,
            compress(occupied, single),
            map(names.__getitem__, map(low.__and__, single_codes)),
        ),
        maxlen=0,
    )

    # Gaps: each empty slot takes the nearer occupied slot's entry; the middle of an
    # odd gap, equally near both, takes the one above (clockwise), as ranked.
    following = [*occupied[1:], occupied[0] + _SLOTS]
    gaps = compress(range(len(occupied)), map((1).__lt__, map(operator.sub, following, occupied)))
    for k in gaps:
        start = occupied[k]
        end = following[k]
        gap = end - start - 1
        below = table[start]
        above = table[end % _SLOTS]
        half = gap // 2
        first = start + 1
        if end <= _SLOTS:
            table[first : first + half] = [below] * half
            table[first + half : end] = [above] * (gap - half)
        else:  # the gap wraps past slot 0
            fill = [below] * half + [above] * (gap - half)
            cut = _SLOTS - first
            table[first:] = fill[:cut]
            table[: gap - cut] = fill[cut:]
    return _Layout(table, occupied, tuple(flat), by_name)


def diff(
    old: HashRing,
    new: HashRing,
    node_uuids: Iterable[str],
    max_load_factor: float | None = None,
) -> dict[str, tuple[str | None, str | None]]:
    """``{node_uuid: (old_owner, new_owner)}`` for the nodes whose owner changed.

    An empty ring owns nothing (``None``).  With *max_load_factor*, both sides are the
    bounded-load assignments of the same node set.
    """
    nodes = list(node_uuids)

    def mapping(ring: HashRing) -> dict[str, str]:
        if not len(ring):
            return {}
        if max_load_factor is None:
            return ring.assign(nodes)
        return ring.assign_bounded(nodes, max_load_factor)

    before = mapping(old)
    after = mapping(new)
    changed: dict[str, tuple[str | None, str | None]] = {}
    for node in nodes:
        was = before.get(node)
        now = after.get(node)
        if was != now:
            changed[node] = (was, now)
    return changed
