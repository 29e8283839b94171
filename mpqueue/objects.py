"""The broker's shared objects (`mpqueue.shared`): their values, holders and waiters.

Like `state.BrokerState`, which owns one of these, it holds no lock, starts
no thread and reads no clock: every method takes ``now``, and the answers to
parked calls it makes answerable collect in ``answers`` for the shell to
send. Values are opaque bytes (pickled by the caller); only a counter's
integer is the broker's to add to.

Who holds a lock or permit is a *group*: ``"job:ID"`` for a job's running
attempt, ``"client:SESSION"`` for a client; an RLock's holder is also the
thread. A group ends when the broker learns that the attempt ended (however:
a result, an exception, a timeout, a death, a cancel, its worker presumed
lost) or that the client left (goodbye, or gone past its grace): what it
held is released, and its waiters are dropped. See docs/shared-state.md.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable

#: Kinds, and how many parameters each takes at creation.
KINDS = ("counter", "dict", "list", "value", "queue", "lock", "rlock", "semaphore", "event")

Owner = tuple[str, int]     # (group, thread id)
Reply = Any
#: A parked call whose wait ran out is answered with this: (done, value).
NOT_YET = (False, None)


class Deleted(KeyError):
    """The shared object was deleted (or replaced) since this handle was made."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "deleted"


@dataclasses.dataclass(eq=False)
class _Waiter:
    owner: Owner
    reply: Reply
    op: str
    args: tuple
    deadline: float


@dataclasses.dataclass(eq=False)
class _Object:
    kind: str
    params: tuple
    generation: int
    value: Any = None
    holders: dict = dataclasses.field(default_factory=dict)     # lock: owner -> count; semaphore: group -> count
    waiters: deque = dataclasses.field(default_factory=deque)
    lent: dict = dataclasses.field(default_factory=dict)        # queue: group -> items it got, not yet confirmed

    def size(self) -> int:
        if self.kind == "dict":
            return sum(len(k) + len(v) for k, v in self.value.items())
        if self.kind in ("list", "queue"):
            return sum(len(v) for v in self.value)
        if self.kind == "value":
            return len(self.value)
        return 0


def _initial(kind: str, params: tuple) -> Any:
    return {"counter": 0, "dict": {}, "list": [], "queue": deque(), "event": False}.get(
        kind, params[0] if kind == "value" else None)


class SharedObjects:
    def __init__(self) -> None:
        self._objects: dict[str, _Object] = {}
        self._generations = 0
        self.answers: list[tuple[Reply, Any]] = []     # (reply, (done, value)) to send
        self.changed: set[str] = set()                  # names to write to a journal
        # group -> names of the objects it holds or waits on (maybe no longer):
        # a job's end looks at those only.
        self._involved: dict[str, set[str]] = {}
        # group -> names of queues that lent it items: an item a process got
        # is only its own once it calls again, or ends well (`group_ended`).
        self._lent_to: dict[str, set[str]] = {}

    # -- creating and deleting ------------------------------------------------

    def open(self, name: str, kind: str, params: tuple) -> int:
        """The object named ``name``, made if new: its generation, which
        every later call names. A name holds one kind with one set of
        parameters: asking for another is an error naming both."""
        if kind not in KINDS:
            raise ValueError(f"no shared object kind {kind!r}")
        obj = self._objects.get(name)
        if obj is None:
            self._generations += 1
            obj = self._objects[name] = _Object(kind, params, self._generations, _initial(kind, params))
            self.changed.add(name)
        elif (obj.kind, obj.params if kind != "value" else ()) != (kind, params if kind != "value" else ()):
            raise ValueError(f"shared object {name!r} is a {_describe(obj.kind, obj.params)}, "
                             f"not a {_describe(kind, params)}")
        return obj.generation

    def delete(self, name: str) -> bool:
        """Remove an object; calls waiting on it fail. Whether it existed."""
        obj = self._objects.pop(name, None)
        if obj is None:
            return False
        self.changed.add(name)
        for waiter in obj.waiters:
            self.answers.append((waiter.reply, ("#ERROR", Deleted(f"shared object {name!r} was deleted"))))
        return True

    # -- calls ----------------------------------------------------------------

    def call(self, owner: Owner, name: str, generation: int, op: str, args: tuple,
             reply: Reply, wait: float, now: float) -> Any:
        """One operation. Returns ``(True, value)``, or ``(False, None)`` if it
        would block and ``wait`` is 0, or `PARKED` (from the caller's view: the
        answer comes in ``answers``) if it must wait. Errors raise."""
        if owner[0] in self._lent_to:
            self._confirm(owner[0])     # it called again: it has what it got
        obj = self._objects.get(name)
        if obj is None or obj.generation != generation:
            raise Deleted(f"shared object {name!r} was deleted")
        done, value = self._apply(obj, name, owner, op, args)
        if done and op == "acquire":
            self._involved.setdefault(owner[0], set()).add(name)
        elif done and op == "get" and obj.kind == "queue":
            self._lend(obj, name, owner[0], value)
        if done or wait <= 0:
            return done, value
        obj.waiters.append(_Waiter(owner, reply, op, args, now + wait))
        self._involved.setdefault(owner[0], set()).add(name)
        return None     # parked

    def _apply(self, obj: _Object, name: str, owner: Owner, op: str, args: tuple) -> tuple[bool, Any]:
        kind = obj.kind
        handler = _OPS.get((kind, op))
        if handler is None:
            raise ValueError(f"a shared {kind} has no operation {op!r}")
        done, value, changed = handler(obj, owner, *args)
        if changed:
            self.changed.add(name)
            self._wake(obj, name)
        return done, value

    def _wake(self, obj: _Object, name: str) -> None:
        """Answer the waiters a change made answerable, first come first."""
        while obj.waiters:
            progress = False
            for waiter in list(obj.waiters):
                done, value, changed = _OPS[(obj.kind, waiter.op)](obj, waiter.owner, *waiter.args)
                if done:
                    obj.waiters.remove(waiter)
                    if waiter.op == "get" and obj.kind == "queue":
                        self._lend(obj, name, waiter.owner[0], value)
                    self.answers.append((waiter.reply, ("#RETURN", (True, value))))
                    progress = progress or changed
                    if obj.kind in ("lock", "rlock", "queue", "semaphore"):
                        break   # what it took may have been the last: look again from the first
            if not progress:
                return

    def _lend(self, obj: _Object, name: str, group: str, item: bytes) -> None:
        obj.lent.setdefault(group, []).append(item)
        self._lent_to.setdefault(group, set()).add(name)

    def _confirm(self, group: str) -> None:
        for name in self._lent_to.pop(group, ()):
            obj = self._objects.get(name)
            if obj is not None:
                obj.lent.pop(group, None)

    def group_ended(self, group: str, failed: bool = True) -> None:
        """A job's attempt or a client is over: release what it held, drop its
        waiters. If it ``failed`` (died, killed, lost), the queue items it got
        and may never have read go back to the front of their queues; else
        they were its own."""
        for name in self._lent_to.pop(group, ()) if failed else ():
            obj = self._objects.get(name)
            items = obj.lent.pop(group, []) if obj is not None else []
            if obj is not None and items:
                obj.value.extendleft(reversed(items))
                self.changed.add(name)
                self._wake(obj, name)
        self._confirm(group)
        for name in self._involved.pop(group, ()):
            obj = self._objects.get(name)
            if obj is None:
                continue
            obj.waiters = deque(w for w in obj.waiters if w.owner[0] != group)
            if obj.kind in ("lock", "rlock"):
                held = [o for o in obj.holders if o[0] == group]
            elif obj.kind == "semaphore":
                held = [group] if group in obj.holders else []
            else:
                continue
            if held:
                for key in held:
                    del obj.holders[key]
                self.changed.add(name)
                self._wake(obj, name)

    def connection_closed(self, reply: Reply) -> None:
        """Waiters on a connection that closed are gone: answering them would
        hand an item or a lock to nobody."""
        for obj in self._objects.values():
            if any(w.reply is reply for w in obj.waiters):
                obj.waiters = deque(w for w in obj.waiters if w.reply is not reply)

    def expire(self, now: float) -> None:
        for obj in self._objects.values():
            for waiter in [w for w in obj.waiters if w.deadline <= now]:
                obj.waiters.remove(waiter)
                self.answers.append((waiter.reply, ("#RETURN", NOT_YET)))

    def next_deadline(self) -> float | None:
        return min((w.deadline for obj in self._objects.values() for w in obj.waiters), default=None)

    # -- reading it all ---------------------------------------------------------

    def listing(self) -> list[dict]:
        """Each object: name, kind and the bytes its values hold (`mpqueue status --json`)."""
        return [{"name": name, "kind": obj.kind, "size": obj.size()} for name, obj in sorted(self._objects.items())]

    def snapshot(self, name: str) -> tuple | None:
        """What a journal stores of an object (None: deleted)."""
        obj = self._objects.get(name)
        if obj is None:
            return None
        value = list(obj.value) if obj.kind == "queue" else obj.value
        return obj.kind, obj.params, obj.generation, value, dict(obj.holders)

    def restore(self, rows: dict[str, tuple]) -> None:
        """Take back a journal's objects (`snapshot`). Holders are kept: the
        shell releases those whose holders do not come back (`group_ended`)."""
        for name, (kind, params, generation, value, holders) in rows.items():
            obj = _Object(kind, tuple(params), generation, deque(value) if kind == "queue" else value,
                          dict(holders))
            self._objects[name] = obj
            self._generations = max(self._generations, generation)
            for holder in holders:
                self._involved.setdefault(holder[0] if isinstance(holder, tuple) else holder, set()).add(name)

    def holder_groups(self) -> set[str]:
        return {o[0] if isinstance(o, tuple) else o for obj in self._objects.values() for o in obj.holders}


def _describe(kind: str, params: tuple) -> str:
    if kind == "queue":
        return f"Queue(maxsize={params[0]})"
    if kind == "semaphore":
        return f"Semaphore({params[0]})"
    return {"rlock": "RLock"}.get(kind, kind.capitalize())


# -- the operations: each returns (done, value, changed) --------------------------


def _counter_add(obj, owner, n):
    obj.value += n
    return True, obj.value, True


def _get(obj, owner):
    return True, obj.value, False


def _dict_set(obj, owner, key, value):
    obj.value[key] = value
    return True, None, True


def _dict_update(obj, owner, pairs):
    obj.value.update(pairs)
    return True, None, bool(pairs)


def _dict_get(obj, owner, key):
    found = obj.value.get(key)
    return True, (found is not None, found), False


def _dict_pop(obj, owner, key):
    found = obj.value.pop(key, None)
    return True, (found is not None, found), found is not None


def _len(obj, owner):
    return True, len(obj.value), False


def _dict_contains(obj, owner, key):
    return True, key in obj.value, False


def _dict_items(obj, owner):
    return True, list(obj.value.items()), False


def _list_append(obj, owner, value):
    obj.value.append(value)
    return True, None, True


def _list_extend(obj, owner, values):
    obj.value.extend(values)
    return True, None, bool(values)


def _list_getitem(obj, owner, index):
    try:
        return True, obj.value[index], False
    except IndexError:
        raise IndexError("shared list index out of range") from None


def _list_setitem(obj, owner, index, value):
    try:
        obj.value[index] = value
    except IndexError:
        raise IndexError("shared list assignment index out of range") from None
    return True, None, True


def _list_pop(obj, owner, index):
    if not obj.value:
        raise IndexError("pop from empty shared list")
    try:
        return True, obj.value.pop(index), True
    except IndexError:
        raise IndexError("shared list pop index out of range") from None


def _list_items(obj, owner):
    return True, list(obj.value), False


def _value_set(obj, owner, value):
    obj.value = value
    return True, None, True


def _value_cas(obj, owner, expected, new):
    if obj.value != expected:
        return True, False, False
    obj.value = new
    return True, True, True


def _queue_put(obj, owner, value):
    maxsize = obj.params[0]
    if maxsize > 0 and len(obj.value) >= maxsize:
        return False, None, False
    obj.value.append(value)
    return True, None, True


def _queue_get(obj, owner):
    if not obj.value:
        return False, None, False
    return True, obj.value.popleft(), True


def _lock_acquire(obj, owner):
    if obj.holders:
        if obj.kind == "rlock" and owner in obj.holders:
            obj.holders[owner] += 1
            return True, True, True
        return False, None, False
    obj.holders[owner] = 1
    return True, True, True


def _lock_release(obj, owner):
    if not obj.holders:
        raise RuntimeError("release unlocked lock")
    holder = next(iter(obj.holders))
    if obj.kind == "rlock":
        if holder != owner:
            raise RuntimeError("cannot release un-acquired lock")
        obj.holders[owner] -= 1
        if obj.holders[owner]:
            return True, None, True
    elif holder[0] != owner[0]:
        raise RuntimeError(f"release of a lock held by another {_whose(holder[0])}")
    del obj.holders[holder]
    return True, None, True


def _lock_locked(obj, owner):
    return True, bool(obj.holders), False


def _semaphore_acquire(obj, owner):
    if sum(obj.holders.values()) >= obj.params[0]:
        return False, None, False
    obj.holders[owner[0]] = obj.holders.get(owner[0], 0) + 1
    return True, True, True


def _semaphore_release(obj, owner):
    group = owner[0]
    if group not in obj.holders:
        raise ValueError("Semaphore released too many times (this job or client holds none of its permits)")
    obj.holders[group] -= 1
    if not obj.holders[group]:
        del obj.holders[group]
    return True, None, True


def _semaphore_value(obj, owner):
    return True, obj.params[0] - sum(obj.holders.values()), False


def _event_set(obj, owner):
    changed = not obj.value
    obj.value = True
    return True, None, changed


def _event_clear(obj, owner):
    changed = obj.value
    obj.value = False
    return True, None, changed


def _event_wait(obj, owner):
    return (True, True, False) if obj.value else (False, None, False)


def _whose(group: str) -> str:
    return "job" if group.startswith("job:") else "client"


_OPS: dict[tuple[str, str], Callable[..., tuple[bool, Any, bool]]] = {
    ("counter", "add"): _counter_add, ("counter", "get"): _get,
    ("dict", "set"): _dict_set, ("dict", "update"): _dict_update, ("dict", "get"): _dict_get,
    ("dict", "pop"): _dict_pop, ("dict", "len"): _len, ("dict", "contains"): _dict_contains,
    ("dict", "items"): _dict_items,
    ("list", "append"): _list_append, ("list", "extend"): _list_extend, ("list", "getitem"): _list_getitem,
    ("list", "setitem"): _list_setitem, ("list", "pop"): _list_pop, ("list", "len"): _len,
    ("list", "items"): _list_items,
    ("value", "get"): _get, ("value", "set"): _value_set, ("value", "cas"): _value_cas,
    ("queue", "put"): _queue_put, ("queue", "get"): _queue_get, ("queue", "len"): _len,
    ("lock", "acquire"): _lock_acquire, ("lock", "release"): _lock_release, ("lock", "locked"): _lock_locked,
    ("rlock", "acquire"): _lock_acquire, ("rlock", "release"): _lock_release, ("rlock", "locked"): _lock_locked,
    ("semaphore", "acquire"): _semaphore_acquire, ("semaphore", "release"): _semaphore_release,
    ("semaphore", "value"): _semaphore_value,
    ("event", "set"): _event_set, ("event", "clear"): _event_clear, ("event", "is_set"): _get,
    ("event", "wait"): _event_wait,
}
