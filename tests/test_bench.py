"""The load tool's pieces: payloads, frame reading, statistics and options, without sockets."""

from __future__ import annotations

import pytest
from twisted.python import usage

from wschat.bench import frames, stats
from wschat.bench.options import Options, parseServer
from wschat.bench.run import assignServers, plans

MARK = frames.marker(0xBEEF)


def message(sender: int, seq: int, sent: int = 0, size: int = 64, prefix: bytes = b"") -> bytes:
    return frames.serverFrame(prefix + frames.payload(MARK, sender, seq, sent, size))


class TestPayload:
    def test_payload_has_exact_size_and_fields(self):
        """A payload is the marker and fixed-width fields, padded to the size asked."""
        p = frames.payload(MARK, 12, 345, 6789, 64)
        assert len(p) == 64
        assert p.startswith(b"#wsbbeef#000012" + b"0000000345" + b"0000000000006789")

    def test_payload_below_minimum_is_refused(self):
        """A size too small for the fields is an error, not a truncated payload."""
        with pytest.raises(ValueError):
            frames.payload(MARK, 1, 1, 1, frames.minimumSize(0xBEEF) - 1)

    def test_marker_run_range(self):
        """Run ids outside 16 bits are refused."""
        with pytest.raises(ValueError):
            frames.marker(0x10000)

    @pytest.mark.parametrize("size", [10, 125, 126, 65535, 65536])
    def test_client_frame_is_masked_with_zero_key(self, size):
        """Client frames carry the mask bit, the right length encoding and a zero key."""
        data = b"a" * size
        f = frames.clientFrame(data)
        assert f[0] == 0x81 and f[1] & 0x80
        assert f.endswith(b"\0\0\0\0" + data)
        assert len(f) == size + 4 + (2 if size < 126 else 4 if size <= 0xFFFF else 10)


class TestFrameReader:
    def test_reads_messages_split_anywhere(self):
        """Messages are counted once whatever the read boundaries, and order is checked."""
        stream = b"".join(message(1, seq) for seq in range(5)) + message(2, 0, size=300)
        for cut in range(1, len(stream)):
            r = frames.FrameReader(MARK)
            r.feed(stream[:cut], 0)
            r.feed(stream[cut:], 0)
            assert (r.tally.received, r.tally.reordered) == (6, 0)

    def test_prefixed_and_foreign_messages(self):
        """The marker is found after a prefix; messages without it (a greeting) are ignored."""
        r = frames.FrameReader(MARK)
        r.feed(frames.serverFrame(b"Welcome to chat!"), 0)
        r.feed(message(3, 0, prefix=b"127.0.0.1:5000: "), 0)
        r.feed(frames.serverFrame(frames.payload(frames.marker(1), 3, 1, 0, 64)), 0)
        assert r.tally.received == 1

    def test_reordered(self):
        """A sequence number going back counts as reordered; one skipping ahead does not."""
        r = frames.FrameReader(MARK)
        for seq in (0, 1, 3, 2, 4):
            r.feed(message(7, seq), 0)
        assert (r.tally.received, r.tally.reordered) == (5, 1)

    def test_latency_only_inside_window(self):
        """Latency is recorded from the embedded send time, for messages sent in the window."""
        r = frames.FrameReader(MARK)
        r.window = (100, 200)
        r.feed(message(1, 0, sent=50) + message(1, 1, sent=150) + message(1, 2, sent=200), 1000)
        assert r.tally.latencies == [850]

    def test_own_echo_and_control_frames(self):
        """Own messages are reported (the closed loop's ack); pings and closes go to onControl."""
        own: list[int] = []
        control: list[tuple[int, bytes]] = []
        r = frames.FrameReader(MARK, 4, own.append, lambda op, d: control.append((op, d)))
        r.feed(message(4, 0) + message(5, 0), 0)
        r.feed(frames.serverFrame(b"p", frames.OP_PING), 0)
        r.feed(frames.serverFrame(b"\x03\xe8", frames.OP_CLOSE), 0)
        assert own == [0]
        assert control == [(frames.OP_PING, b"p"), (frames.OP_CLOSE, b"\x03\xe8")]

    def test_marker_counter_counts_across_reads(self):
        """The cheap receiver counts exactly even when a marker is split between reads."""
        stream = b"".join(message(1, seq) for seq in range(4))
        for cut in range(1, len(stream)):
            c = frames.MarkerCounter(MARK)
            c.feed(stream[:cut])
            c.feed(stream[cut:])
            assert c.tally.received == 4


class TestHandshake:
    def test_request_names_host_and_path(self):
        """The upgrade request carries Host (IPv6 in brackets) and the path."""
        req = frames.handshakeRequest("::1", 9000, "/chat")
        assert req.startswith(b"GET /chat HTTP/1.1\r\nHost: [::1]:9000\r\n")
        assert req.endswith(b"\r\n\r\n")

    def test_response_incomplete_then_complete(self):
        """Headers are waited for; bytes after them are the first frames."""
        assert frames.handshakeResponse(b"HTTP/1.1 101 Switching") == (
            False,
            b"HTTP/1.1 101 Switching",
        )
        done, rest = frames.handshakeResponse(b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\nXY")
        assert done and rest == b"XY"

    def test_refusal_is_an_error(self):
        """Any status but 101 is a HandshakeError naming it."""
        with pytest.raises(frames.HandshakeError, match="403"):
            frames.handshakeResponse(b"HTTP/1.1 403 Forbidden\r\n\r\n")


class TestStats:
    def test_quantize_exact_then_relative(self):
        """Below 1 ms values are exact; above, within 0.1 % and never above the value."""
        assert stats.quantize(999) == 999
        for v in (1024, 5000, 123456, 10**7):
            q = stats.quantize(v)
            assert q <= v and (v - q) / v < 0.001

    def test_percentiles_nearest_rank(self):
        """p50/p99/max of 1..100 are 50, 99 and 100."""
        h = stats.histogram(range(1, 101))
        assert stats.percentiles(h, (50, 99, 100)) == {50: 50, 99: 99, 100: 100}

    def test_merge_and_summary(self):
        """Histograms from several processes merge; the summary is in milliseconds."""
        h = stats.merge([stats.histogram([1000] * 3), stats.histogram([3000])])
        s = stats.latencySummary(h)
        assert s["p50"] == 1.0 and s["max"] == 3.0 and s["samples"] == 4

    def test_empty_summary(self):
        """No samples gives no percentiles rather than zeros."""
        assert stats.latencySummary({}) == {
            "p50": None,
            "p90": None,
            "p99": None,
            "max": None,
            "samples": 0,
        }


def parse(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


class TestOptions:
    def test_throughput_defaults(self):
        """The defaults are the saturated scenario: 1000 clients, 10 senders x 4 in flight."""
        o = parse("throughput", "--run-id", "7")
        assert {k: o[k] for k in ("mode", "clients", "senders", "inflight", "size", "rates")} == {
            "mode": "throughput",
            "clients": 1000,
            "senders": 10,
            "inflight": 4,
            "size": 64,
            "rates": [None],
        }
        assert o["servers"] == [("ws://127.0.0.1:2000/", "127.0.0.1", 2000, "/")]

    def test_rate_sweep_and_named_urls(self):
        """--rate takes a list to sweep; --url repeats and may be named."""
        o = parse("rate", "--rate", "10,20.5", "-u", "a=ws://h:1/x", "-u", "ws://[::1]:2")
        assert o["rates"] == [10.0, 20.5]
        assert o["servers"] == [("a", "h", 1, "/x"), ("ws://[::1]:2", "::1", 2, "/")]

    @pytest.mark.parametrize(
        ("args", "error"),
        [
            ((), "give a mode"),
            (("flood",), "mode must be one of"),
            (("rate",), "needs --rate"),
            (("throughput", "--rate", "5"), "for rate mode"),
            (("rate", "--rate", "5,-1"), "positive"),
            (("throughput", "--senders", "0"), "at least one sender"),
            (("throughput", "--clients", "5", "--senders", "6"), "between 0"),
            (("throughput", "--size", "8"), "at least"),
            (("throughput", "--url", "wss://h"), "only ws://"),
            (("throughput", "--verify", "some"), "'all' or a number"),
            (("idle", "--plot", "x.png"), "rate mode"),
            (("throughput", "--spread", "--url", "ws://h:1/"), "two or more --url"),
        ],
    )
    def test_bad_options_are_usage_errors(self, args, error):
        """Each bad combination is refused with a message saying what is wrong."""
        with pytest.raises(usage.UsageError, match=error):
            parse(*args)

    def test_parse_server_rejects_bad_port(self):
        """A URL whose port is not a number is a usage error."""
        with pytest.raises(usage.UsageError):
            parseServer("ws://h:port/")


class TestPlans:
    def test_clients_and_senders_spread_over_workers(self):
        """Every client goes to exactly one worker, senders are spread, schedules staggered."""
        o = parse("rate", "--clients", "10", "--senders", "4", "--rate", "40", "--verify", "2")
        ps = plans(o, [("127.0.0.1", 1, "/")], 40.0, 3)
        everyone = sorted(n for p in ps for n in p.clients)
        assert everyone == list(range(10))
        senders = sorted(s for p in ps for s in p.senders)
        assert senders == [0, 2, 5, 7]
        assert all(p.ratePerSender == 10.0 for p in ps)
        phases = sorted(ph for p in ps for ph in p.phases.values())
        assert phases == [0.0, 0.025, 0.05, 0.075]
        verifiers = [v for p in ps for v in p.verifiers]
        assert len(verifiers) == 2 and not set(verifiers) & set(senders)
        assert all(p.clientTargets == (0,) * len(p.clients) for p in ps)

    def test_spread_assigns_each_kind_round_robin(self):
        """One round-robin over senders, then other verifiers, then the rest: all kinds shared."""
        where = assignServers(10, frozenset({0, 5}), frozenset({1, 2, 3}), 3)
        assert where == (0, 2, 0, 1, 2, 1, 0, 1, 2, 0)

    def test_spread_plans_balance_senders_over_servers(self):
        """With --spread every client has one server, and each server gets its share of senders
        and verifiers, whatever the stride of either."""
        urls = [f"ws://127.0.0.1:{p}/" for p in (1, 2, 3)]
        o = parse(
            "throughput",
            "--clients",
            "300",
            "--senders",
            "6",
            "--spread",
            *(a for u in urls for a in ("--url", u)),
        )
        assert o["groups"] == [o["servers"]]
        targets = [("127.0.0.1", p, "/") for p in (1, 2, 3)]
        ps = plans(o, targets, None, 2)
        assert all(p.targets == tuple(targets) for p in ps)
        where = {n: t for p in ps for n, t in zip(p.clients, p.clientTargets, strict=True)}
        assert sorted(where) == list(range(300))
        for kind in (
            [s for p in ps for s in p.senders],
            [v for p in ps for v in p.verifiers],
            list(where),
        ):
            perServer = [sum(1 for n in kind if where[n] == t) for t in range(3)]
            assert max(perServer) - min(perServer) <= 1, perServer
        assert len([s for p in ps for s in p.senders]) == 6

    def test_without_spread_one_run_per_url(self):
        """Without --spread, each --url is a run of its own."""
        o = parse("throughput", "--url", "ws://h:1/", "--url", "ws://h:2/")
        assert o["groups"] == [[s] for s in o["servers"]]


class TestSchedule:
    def test_late_send_carries_its_scheduled_time(self):
        """A message sent after its time counts the delay: it carries the scheduled time."""
        from wschat.bench.worker import sentStamp

        assert sentStamp(1.0, 1_000_500) == 1_000_000

    def test_early_send_carries_its_real_time(self):
        """A message sent before its time (timer fired early) carries the real send time."""
        from wschat.bench.worker import sentStamp

        assert sentStamp(1.0, 999_400) == 999_400
