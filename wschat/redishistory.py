"""
The room's history and presence in Redis: the Lua scripts the Redis bus runs, and how their
replies are read.

Keys of a room on channel ``C`` (all in the DB of ``--redis``):

``C:position`` (hash)
    ``epoch`` (16 hex characters naming this generation of the room's history) and ``seq``
    (the last position given). Created with a new random epoch when missing: a new room, or a
    Redis that lost its data.
``C:history`` (stream)
    The last N envelopes (``--history``), entry ID ``<seq>-1``, field ``e``: the envelope as
    published. Trimmed exactly to N on each append (``MAXLEN N``, not ``~``: every daemon
    then knows where the window starts, and the memory bound is N envelopes); it expires
    ``--history-ttl`` seconds after the last message, when all it holds is too old anyway.
``C:id:<id>`` (string)
    ``epoch:seq`` of the message sent with that client-chosen id, for ``--history-ttl``
    seconds: a resend with that id is not relayed again.
``C:presence`` (hash) and ``C:alive:<node>`` (string)
    Each daemon's connection count (``version count``) and a key that lives for the presence
    bound unless that daemon's heartbeat renews it.

Each script is run with EVALSHA, and with EVAL when Redis answers NOSCRIPT (a restarted or
flushed script cache).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from wschat.envelope import Envelope, MalformedEnvelope, decodeEnvelope
from wschat.history import Position

# Number, store and publish one message, exactly once per client-chosen id.
# KEYS: position, history, and the id's key (absent: no id).
# ARGV: a new epoch (used if the room has none), MAXLEN, lifetime of the stream and the id
#       (ms), channel, the envelope without its position (array header for 9 elements).
# Returns {1, epoch, seq, receivers} when relayed, {0, epoch, seq} for an id already relayed.
RELAY = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('DEL', KEYS[2])
end
if KEYS[3] then
  local original = redis.call('GET', KEYS[3])
  if original then
    local e, s = string.match(original, '^([0-9a-z]+):([0-9]+)$')
    if e == epoch then
      return {0, epoch, tonumber(s)}
    end
  end
end
local seq = (tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0) + 1
local position = string.format('%d', seq)
local envelope = ARGV[5] .. cmsgpack.pack(epoch) .. cmsgpack.pack(seq)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], position .. '-1', 'e', envelope)
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if KEYS[3] then
  redis.call('SET', KEYS[3], epoch .. ':' .. position, 'PX', ARGV[3])
end
return {1, epoch, seq, redis.call('PUBLISH', ARGV[4], envelope)}
"""

# The room's epoch and head, and envelopes of its history.
# KEYS: position, history.
# ARGV: a new epoch (used if the room has none), the epoch the caller knows, the first entry ID
#       wanted in that epoch, how many at most.
# Returns {epoch, head, 1, entries from that ID} if the room's epoch is the one the caller
# knows, else {epoch, head, 0, the last entries, newest first}.
READ = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('DEL', KEYS[2])
end
local head = tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0
if epoch == ARGV[2] then
  return {epoch, head, 1, redis.call('XRANGE', KEYS[2], ARGV[3], '+', 'COUNT', ARGV[4])}
end
return {epoch, head, 0, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[4])}
"""

# One daemon's report: its connection count, its alive key renewed, its presence envelope (if
# any) published; then every daemon's count whose alive key still lives (the others are
# removed: their daemon stopped reporting).
# KEYS: presence hash, this daemon's alive key.
# ARGV: node, "version count", alive lifetime (ms), channel, presence envelope or "",
#       prefix of the alive keys.
# Returns {node, "version count", alive ms left, ...}.
REPORT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
local found = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local left = redis.call('PTTL', ARGV[6] .. all[i])
  if left > 0 then
    table.insert(found, all[i])
    table.insert(found, all[i + 1])
    table.insert(found, left)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return found
"""

# A daemon leaves the room: its count and alive key go, and the others are told.
# KEYS: presence hash, this daemon's alive key. ARGV: node, channel, presence envelope.
GOODBYE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return redis.call('PUBLISH', ARGV[2], ARGV[3])
"""


class Script:
    """A Lua script, run by its SHA1 digest, and by its text when Redis does not have it."""

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest()

    def __call__(
        self, redis: Any, keys: Sequence[str | bytes], args: Sequence[str | bytes | int]
    ) -> defer.Deferred[Any]:
        """
        Run on ``redis`` (a txredisapi protocol); fires with the reply.

        @raise txredisapi.ConnectionError: ``redis`` is not connected.
        """

        def noScript(reason: Any) -> Any:
            if "NOSCRIPT" in str(reason.value):
                return redis.execute_command("EVAL", self.source, len(keys), *keys, *args)
            return reason

        sent: defer.Deferred[Any] = redis.execute_command(
            "EVALSHA", self.sha, len(keys), *keys, *args
        )
        return sent.addErrback(noScript)


relayScript = Script(RELAY)
readScript = Script(READ)
reportScript = Script(REPORT)
goodbyeScript = Script(GOODBYE)


class MalformedReply(ValueError):
    """Redis answered a script with something it does not return."""


@dataclass(frozen=True, slots=True)
class Stored:
    """What :data:`READ` found: the room's epoch and head, and messages, oldest first."""

    #: A message of the history and its position.
    Entry = tuple[Position, Envelope]

    epoch: str
    head: int
    #: True: the messages after the position asked for; False: the last ones of the room,
    #: whose epoch is not the one the caller knew.
    after: bool
    entries: list[Entry]
    #: Entries that could not be read (skipped).
    malformed: int = 0


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, str):
        return value
    raise MalformedReply(f"expected a string, not {value!r}")


def _int(value: object) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bytes) and value.isdigit():
        return int(value)
    raise MalformedReply(f"expected an integer, not {value!r}")


def readStored(reply: object) -> Stored:
    """The reply of :data:`READ`."""
    if not (isinstance(reply, list) and len(reply) == 4 and isinstance(reply[3], list)):
        raise MalformedReply(f"not a READ reply: {reply!r:.100}")
    epoch, head, after = _text(reply[0]), _int(reply[1]), bool(_int(reply[2]))
    entries = []
    malformed = 0
    for entry in reply[3] if after else reversed(reply[3]):
        try:
            entries.append(_storedEntry(entry, epoch))
        except (MalformedEnvelope, MalformedReply):
            malformed += 1
    return Stored(epoch, head, after, entries, malformed)


def _storedEntry(entry: object, epoch: str) -> Stored.Entry:
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
        raise MalformedReply("not a stream entry")
    fields = entry[1]
    data = fields[1] if len(fields) >= 2 and fields[0] == b"e" else None
    if not isinstance(data, bytes):
        raise MalformedReply("a stream entry without an envelope")
    envelope = decodeEnvelope(data)
    if not isinstance(envelope, Envelope) or envelope.position is None:
        raise MalformedReply("a stream entry without a position")
    seq = _int(_text(entry[0]).partition("-")[0].encode())
    if envelope.position != Position(epoch, seq):
        raise MalformedReply("a stream entry out of place")
    return envelope.position, envelope


@dataclass(frozen=True, slots=True)
class Relayed:
    """What :data:`RELAY` did: relayed at (``epoch``, ``seq``), or found a duplicate there."""

    duplicate: bool
    epoch: str
    seq: int
    receivers: int


def readRelayed(reply: object) -> Relayed:
    """The reply of :data:`RELAY`."""
    if not (isinstance(reply, list) and len(reply) in (3, 4)):
        raise MalformedReply(f"not a RELAY reply: {reply!r:.100}")
    relayed = _int(reply[0])
    receivers = _int(reply[3]) if relayed else 0
    return Relayed(not relayed, _text(reply[1]), _int(reply[2]), receivers)


@dataclass(frozen=True, slots=True)
class Alive:
    """One daemon of the room as :data:`REPORT` found it."""

    node: str
    version: int
    count: int
    #: Seconds its alive key has left.
    left: float


def readAlive(reply: object) -> list[Alive]:
    """The reply of :data:`REPORT`; entries that cannot be read are left out."""
    if not (isinstance(reply, list) and len(reply) % 3 == 0):
        raise MalformedReply(f"not a REPORT reply: {reply!r:.100}")
    found = []
    for i in range(0, len(reply), 3):
        try:
            version, _, count = _text(reply[i + 1]).partition(" ")
            found.append(
                Alive(_text(reply[i]), int(version), int(count), _int(reply[i + 2]) / 1000)
            )
        except (MalformedReply, ValueError):
            continue
    return found
