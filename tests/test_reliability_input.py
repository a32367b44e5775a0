"""Hostile input: property-based fuzzing (hypothesis) of every RPC's fields against a real
`unmask serve` process (tiny model, embedded dispatcher).

Every call must end with a typed status: OK or a caller's-mistake code (INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED), never UNKNOWN or INTERNAL, except the documented INTERNAL for
"the model wrote no playable MIDI" (field `output`). The server must stay SERVING, write no
traceback, and its memory must stay bounded (RSS of the server process, /proc).

Each property runs EXAMPLES examples in the default run (UNMASK_FUZZ_EXAMPLES overrides) and
DEEP_EXAMPLES in its `_deep` twin, marked slow: `pytest -m slow tests/test_reliability_input.py`.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_fixtures import free_port

from unmask.client import Client, ServiceError
from unmask.client import _error as rpc_error
from unmask.v1 import unmask_pb2 as pb

SERVICE = "/unmask.v1.Unmask/"
UNARY = ("Generate", "SubmitBatch", "GetJob", "ListJobs", "CancelJob", "ListModels", "GetModel")
STREAMING = ("GenerateStream", "StreamJobResults")
CALLER_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
MAX_BATCH_ITEMS = 8
MESSAGE_LIMIT = 16 << 20  # the server's default UNMASK_MAX_MESSAGE_BYTES
RSS_GROWTH_LIMIT = 48 << 20  # the second half of the hostile rounds may add at most this
ROUNDS = 6


EXAMPLES = int(os.environ.get("UNMASK_FUZZ_EXAMPLES", "60"))
DEEP_EXAMPLES = 600
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(**strategies):
    """A property test and its slow `_deep` twin with DEEP_EXAMPLES examples."""

    def make(prop):
        quick = FUZZ(given(**strategies)(prop))
        deep = settings(FUZZ, max_examples=DEEP_EXAMPLES)(given(**strategies)(prop))
        return quick, pytest.mark.slow(deep)

    return make


@pytest.fixture(autouse=True)
def _slow_only_with_m_slow(request):
    """`slow` tests run only when selected (`-m slow`); CI's plain run skips them."""
    if request.node.get_closest_marker("slow") and "slow" not in (
        request.config.getoption("markexpr") or ""
    ):
        pytest.skip("slow: run with -m slow")


# ---- the server under attack ----------------------------------------------------------------
class ServeProcess:
    """`unmask serve --model <tiny>` (or, model_dir None, with the environment's broker) in a
    subprocess, its log in a file."""

    def __init__(self, model_dir, log_path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {**os.environ, "UNMASK_DEVICE": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
        self.model_dir = model_dir
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> ServeProcess:
        cmd = [sys.executable, "-m", "unmask", "serve", "--port", str(self.port), *extra]
        if self.model_dir is not None:  # else: the broker named in the environment
            cmd += ["--model", str(self.model_dir)]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the server process, in bytes."""
        assert self.proc is not None
        return proc_memory(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return None if self.proc is None else self.proc.returncode


def proc_memory(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = ServeProcess(tiny_model_dir, log, {"UNMASK_MAX_BATCH_ITEMS": str(MAX_BATCH_ITEMS),
                                             "UNMASK_BATCH_WINDOW": "2"})  # fmt: skip
    srv.start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            c.wait_ready(timeout=120)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", max_message_bytes=64 << 20, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def raw(server):
    """A channel for hand-made bytes (identity serializers) and large messages."""
    opts = [("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)]  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", opts) as ch:
        yield ch


def _code(call) -> tuple[str, ServiceError | None]:
    try:
        result = call()
        if hasattr(result, "__next__"):
            for _ in result:
                pass
    except ServiceError as exc:
        return exc.code, exc
    return "OK", None


def assert_typed(code: str, err: ServiceError | None, what: object = "") -> None:
    """A caller's mistake gets a caller's-mistake code; the one documented INTERNAL is a MIDI
    output with no playable notes."""
    if code == "INTERNAL" and err is not None and err.field == "output":
        assert "no playable notes" in err.message, err
        return
    assert code in CALLER_CODES, f"{code}: {err} for {what!r}"[:2000]
    if code == "INVALID_ARGUMENT":
        assert err is not None and err.field, f"no field named: {err}"
        assert err.message.startswith(err.field + ":"), err


def raw_call(
    ch: grpc.Channel, method: str, payload: bytes, timeout: float = 120
) -> tuple[str, ServiceError | None]:
    """Send hand-made bytes to a method; (status code name, the error)."""
    ident = {"request_serializer": None, "response_deserializer": None}
    try:
        if method in STREAMING:
            for _ in ch.unary_stream(SERVICE + method, **ident)(payload, timeout=timeout):
                pass
        else:
            ch.unary_unary(SERVICE + method, **ident)(payload, timeout=timeout)
    except grpc.RpcError as exc:
        err = rpc_error(exc)
        return err.code, err
    return "OK", None


def assert_serving(server, client) -> None:
    assert server.alive(), server.log()[-3000:]
    assert client.health() == "SERVING"


@pytest.fixture(autouse=True)
def _still_serving_after_each_test(request):
    yield
    if {"server", "client"} <= set(request.fixturenames):
        assert_serving(request.getfixturevalue("server"), request.getfixturevalue("client"))


# ---- strategies -----------------------------------------------------------------------------
odd_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["Cc", "Cf", "Co", "Mn", "Zs", "So"]), max_size=40),
    st.sampled_from([
        "", " ", "\x00", "\u202e\u202dRTL", "e\u0301\u0301\u0301", "\ufeff", "\U0001f600" * 50,
        "[MASK:3]", "[MASK:-1]", "[MASK:99999999999]", "[MASK:", "\ud7ff\ue000\uffff",
        "A" * 300, "\n" * 100, "<|endoftext|>", "%s%n%x", "${jndi:ldap://x}", "'; DROP --",
    ]),
)  # fmt: skip
uint32 = st.one_of(
    st.integers(0, 12), st.sampled_from([0, 1, 255, 256, 257, 65536, 2**31 - 1, 2**32 - 1])
)
uint64 = st.one_of(st.integers(0, 100), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
double = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-320, -1.0, 1e308, float("nan"), float("-inf")]),
)
small_length = st.integers(1, 12)  # keeps the requests that are valid cheap to run
midi_bytes = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=256).map(lambda b: b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0" + b),
    st.binary(max_size=256).map(lambda b: b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x00\x60MTrk"
                                + len(b).to_bytes(4, "big") + b),
)  # fmt: skip


@st.composite
def sampler_params(draw) -> pb.SamplerParams:
    p = pb.SamplerParams(gen_length=draw(st.one_of(small_length, uint32)))
    for name, strat in (
        ("steps", uint32), ("block_length", uint32), ("threshold", double),
        ("position_score", st.one_of(odd_text, st.sampled_from(["margin", "entropy"]))),
        ("temperature", double), ("top_k", uint32), ("top_p", double),
        ("remask_budget", uint32), ("remask_threshold", double),
        ("cache", st.one_of(odd_text, st.sampled_from(["none", "prefix", "dual"]))),
        ("max_steps", uint32), ("seed", uint64), ("stop_at_eos", st.booleans()),
        ("grammar", st.booleans()),
    ):  # fmt: skip
        if draw(st.integers(0, 3)) == 0:
            setattr(p, name, draw(strat))
    return p


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(
        model=draw(st.one_of(st.just(""), odd_text)),
        modality=draw(st.one_of(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))),
        params=draw(sampler_params()),
    )
    source = draw(st.sampled_from(["none", "prompt", "midi", "infill", "midi_infill", "settings"]))
    if source == "prompt":
        msg.prompt = draw(odd_text)
    elif source == "midi":
        msg.midi = draw(midi_bytes)
    elif source == "infill":
        segments = draw(st.lists(st.one_of(
            odd_text.map(lambda t: pb.Segment(text=t)),
            uint32.map(lambda n: pb.Segment(mask=n)),
            st.just(pb.Segment()),
        ), max_size=6))  # fmt: skip
        msg.infill.CopyFrom(pb.Infill(segments=segments))
    elif source == "midi_infill":
        msg.midi_infill.CopyFrom(pb.MidiInfill(
            midi=draw(midi_bytes), bars=draw(st.lists(uint32, max_size=5)),
            tracks=draw(st.lists(uint32, max_size=5)),
        ))  # fmt: skip
    elif source == "settings":
        msg.midi_settings.CopyFrom(pb.MidiSettings(
            time_signature=draw(st.one_of(odd_text, st.sampled_from(
                ["4/4", "3/4", "6/8", "0/4", "4/0", "99/64", "-1/4", "4/4/4"]))),
            tempo=draw(double), programs=draw(st.lists(uint32, max_size=20)),
            voices=draw(uint32), bars=draw(uint32),
        ))  # fmt: skip
    return msg


# ---- generation -----------------------------------------------------------------------------
def _generate_property(server, client, msg, stream):
    if stream:
        code, err = _code(lambda: client.run_stream(msg))
    else:
        code, err = _code(lambda: client.run(msg))
    assert_typed(code, err, msg)


test_fuzzed_generate_requests_get_typed_statuses, test_fuzzed_generate_requests_deep = fuzz(
    msg=generate_requests(), stream=st.booleans()
)(_generate_property)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers: two's complement, as int64 on the wire
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


# integer fields of SamplerParams / MidiSettings / MidiInfill, by field number
PARAM_INTS = {"gen_length": 1, "steps": 2, "block_length": 3, "top_k": 7, "remask_budget": 9,
              "max_steps": 12, "seed": 13}  # fmt: skip
SETTINGS_INTS = {"programs": 3, "voices": 4, "bars": 5}
# as an int32 (int64 for the seed) would send them: uint32 fields see 2**32 - n, never small
negative = st.one_of(st.integers(-(2**31), -1), st.sampled_from([-1, -2, -(2**31)]))


def _negative_property(server, raw, params, settings_ints, bars):
    """proto3 has no negative uint32: a client can still put a negative varint on the wire
    (it arrives as a huge number). Each is refused by field, never run."""
    body = pb.SamplerParams(gen_length=4, steps=2).SerializeToString()
    body += b"".join(_varint_field(PARAM_INTS[k], v) for k, v in params.items())
    if settings_ints:
        midi = b"".join(_varint_field(SETTINGS_INTS[k], v) for k, v in settings_ints.items())
        request = _bytes_field(7, midi)
    elif bars:
        mi = _bytes_field(1, b"MThd") + b"".join(_varint_field(2, v) for v in bars)
        request = _bytes_field(6, mi)
    else:
        request = _bytes_field(3, b"x")
    request += _bytes_field(8, body)
    for method in ("Generate", "GenerateStream"):
        code, err = raw_call(raw, method, request)
        assert code == "INVALID_ARGUMENT", (method, params, settings_ints, bars, err)
        assert_typed(code, err)


test_negative_numbers_on_the_wire_are_rejected, test_negative_numbers_deep = fuzz(
    params=st.dictionaries(st.sampled_from(sorted(PARAM_INTS)), negative, min_size=1),
    settings_ints=st.dictionaries(st.sampled_from(sorted(SETTINGS_INTS)), negative),
    bars=st.lists(negative, max_size=3),
)(_negative_property)


# ---- batches, jobs, models ------------------------------------------------------------------
@st.composite
def batch_requests(draw) -> pb.SubmitBatchRequest:
    n = draw(st.one_of(st.integers(0, 4), st.sampled_from([MAX_BATCH_ITEMS + 1, 1000])))
    cheap = pb.GenerateRequest(prompt="x", params=pb.SamplerParams(gen_length=2, steps=1))
    items = []
    for i in range(n):
        if i < 4 and draw(st.booleans()):
            request = draw(generate_requests())
        else:
            request = cheap
        custom_id = draw(st.one_of(st.just(f"c{i}"), st.just("dup"), odd_text))
        items.append(pb.BatchItem(custom_id=custom_id, request=request))
    return pb.SubmitBatchRequest(
        items=items, idempotency_key=draw(st.one_of(st.just(""), odd_text)),
        model=draw(st.one_of(st.just(""), odd_text)),
    )  # fmt: skip


def _batch_property(server, client, msg):
    code, err = _code(lambda: client._unary("SubmitBatch", msg))
    assert_typed(code, err, msg)


test_fuzzed_batches_get_typed_statuses, test_fuzzed_batches_deep = fuzz(msg=batch_requests())(
    _batch_property
)


def _lookup_property(server, client, ident, page_size, page_token, offset, follow, use_real):
    real = _a_batch(client) if use_real else ident
    calls = {
        "GetJob": lambda: client.get_batch(ident),
        "CancelJob": lambda: client.cancel_batch(ident),
        "ListJobs": lambda: client._unary(
            "ListJobs", pb.ListJobsRequest(page_size=page_size, page_token=page_token)
        ),  # fmt: skip
        "StreamJobResults": lambda: client.batch_results(real, follow=follow, offset=offset),
        "GetModel": lambda: client.get_model(ident),
        "ListModels": lambda: client.list_models(),
    }
    for name, call in calls.items():
        code, err = _code(call)
        assert_typed(code, err, (name, ident, page_size, page_token, offset))


test_fuzzed_lookups_get_typed_statuses, test_fuzzed_lookups_deep = fuzz(
    ident=st.one_of(odd_text, st.just("batch_" + "0" * 32), st.text(min_size=5000, max_size=5000)),
    page_size=uint32, page_token=st.one_of(odd_text, st.sampled_from(
        ["-1", "0", "1e9", "99999999999999999999", "0x10", " 3", "nan"])),
    offset=uint32, follow=st.booleans(), use_real=st.booleans(),
)(_lookup_property)  # fmt: skip


_BATCHES: list[str] = []


def _a_batch(client: Client) -> str:
    if not _BATCHES:
        rows = [{"custom_id": "a", "body": {"prompt": "x", "params": {"gen_length": 2}}}]
        _BATCHES.append(client.submit_batch(rows).id)
    return _BATCHES[0]


def _garbage_property(server, raw, payload, method):
    """Random bytes as a whole request: INVALID_ARGUMENT (field `request`) when they do not
    parse, else whatever the message they happen to spell deserves."""
    code, err = raw_call(raw, method, payload)
    assert_typed(code, err, (method, payload))


test_garbage_bytes_to_every_method_get_typed_statuses, test_garbage_bytes_deep = fuzz(
    payload=st.one_of(
        st.binary(max_size=2048),
        st.binary(min_size=1, max_size=64).map(lambda b: b"\x1a" + _varint(len(b)) + b),
    ),
    method=st.sampled_from(UNARY + STREAMING),
)(_garbage_property)


def test_corrupt_messages_are_invalid_argument_naming_the_request(server, raw):
    for method in UNARY + STREAMING:
        payloads = [b"\xff\xff\xff\xff", b"\x0a\xff", b"\x0a\x10abc"]  # bad tag, truncated
        if method not in ("ListJobs", "ListModels"):  # field 1 is a string or a message
            payloads.append(b"\x0a\x05\xff\xfe\xfd\xfc\xfb")  # bad UTF-8 / corrupt message
        for payload in payloads:
            code, err = raw_call(raw, method, payload)
            assert code == "INVALID_ARGUMENT" and err.field == "request", (method, payload, err)


def test_a_corrupt_message_names_the_field_request(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        call = c.channel.unary_unary(SERVICE + "GetJob", request_serializer=None,
                                     response_deserializer=pb.BatchJob.FromString)  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\x03\xff\xfe\xfd", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request:")
    assert ("unmask-field", "request") in err.value.trailing_metadata()


# ---- size limits ----------------------------------------------------------------------------
OVERSIZED = [
    ("a prompt over the message limit", lambda: pb.GenerateRequest(prompt="x" * (MESSAGE_LIMIT + 1)),
     "RESOURCE_EXHAUSTED", None),
    ("MIDI over the message limit", lambda: pb.GenerateRequest(midi=b"\0" * (MESSAGE_LIMIT + 1)),
     "RESOURCE_EXHAUSTED", None),
    ("a prompt over 200k characters", lambda: pb.GenerateRequest(prompt="\u00e9" * 200_001),
     "INVALID_ARGUMENT", "prompt"),
    ("MIDI over 4 MiB", lambda: pb.GenerateRequest(midi=b"MThd" + b"\0" * (4 << 20)),
     "INVALID_ARGUMENT", "midi"),
    ("a million gaps", lambda: pb.GenerateRequest(infill=pb.Infill(
        segments=[pb.Segment(mask=1)] * 100_000)), "INVALID_ARGUMENT", None),
    ("100k bars", lambda: pb.GenerateRequest(midi_infill=pb.MidiInfill(
        midi=b"MThd", bars=list(range(100_000)))), "INVALID_ARGUMENT", None),
    ("100k programs", lambda: pb.GenerateRequest(midi_settings=pb.MidiSettings(
        programs=[0] * 100_000)), "INVALID_ARGUMENT", "midi_settings.programs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "build", "code", "field"), OVERSIZED, ids=[o[0] for o in OVERSIZED]
)
def test_oversized_requests_are_refused_cheaply(server, client, what, build, code, field):
    msg = build()
    msg.params.CopyFrom(pb.SamplerParams(gen_length=4, steps=2))
    t0 = time.monotonic()
    got, err = _code(lambda: client.run(msg))
    assert got == code, (what, err)
    if field:
        assert err is not None and err.field == field
    assert time.monotonic() - t0 < 20, f"{what}: refusing took {time.monotonic() - t0:.1f}s"


def test_too_many_batch_items_and_huge_custom_ids(server, client):
    cheap = {"prompt": "x", "params": {"gen_length": 2}}
    rows = [{"custom_id": f"c{i}", "body": cheap} for i in range(MAX_BATCH_ITEMS + 1)]
    code, _ = _code(lambda: client.submit_batch(rows))
    assert code == "RESOURCE_EXHAUSTED"
    code, err = _code(lambda: client.submit_batch([{"custom_id": "x" * 257, "body": cheap}]))
    assert code == "INVALID_ARGUMENT" and err.field == "items[0].custom_id"
    code, err = _code(lambda: client.submit_batch([{"custom_id": "a", "body": cheap}],
                                                  idempotency_key="k" * 257))  # fmt: skip
    assert code == "INVALID_ARGUMENT" and err.field == "idempotency_key"


# ---- the server after all that --------------------------------------------------------------
def _hostile_round(client: Client, raw: grpc.Channel, rng: random.Random) -> None:
    """A fixed mix of hostile calls: oversized, big random MIDI files, corrupt messages, NaN and
    infinite numbers, unknown enum values, random MIDI-looking bytes, odd Unicode."""
    _code(lambda: client.run(pb.GenerateRequest(prompt="x" * (MESSAGE_LIMIT + 1))))
    for _ in range(6):
        _code(lambda: client.run(pb.GenerateRequest(midi=rng.randbytes(3 << 20))))
    for _ in range(10):
        raw_call(raw, rng.choice(UNARY + STREAMING), rng.randbytes(rng.randint(1, 4096)))
    for value in (math.nan, math.inf, -1.0):
        for name in ("threshold", "temperature", "top_p", "remask_threshold"):
            _code(lambda n=name, v=value: client.run(pb.GenerateRequest(
                prompt="x", params=pb.SamplerParams(gen_length=4, **{n: v}))))  # fmt: skip
        _code(lambda v=value: client.run(pb.GenerateRequest(midi_settings=pb.MidiSettings(
            tempo=v), params=pb.SamplerParams(gen_length=4))))  # fmt: skip
    for modality in (4, -1):
        _code(lambda m=modality: client.run(pb.GenerateRequest(prompt="x", modality=m)))
    for _ in range(4):
        _code(lambda: client.run(pb.GenerateRequest(midi=b"MThd" + rng.randbytes(200),
                                                    params=pb.SamplerParams(gen_length=4))))  # fmt: skip
        odd = "".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                      for _ in range(200))  # fmt: skip
        _code(lambda t=odd: client.run(pb.GenerateRequest(
            prompt=t, params=pb.SamplerParams(gen_length=4, steps=2))))  # fmt: skip


def test_the_server_stays_serving_with_bounded_memory(server, client, raw):
    """The same hostile calls again must not cost more memory: warm up (caches, allocator
    arenas, lazy imports) with ROUNDS rounds, then ROUNDS more may add at most
    RSS_GROWTH_LIMIT. (A server that kept each finished job for a minute grew 132 MiB in the
    second half here; with the fix, 16 MiB.)"""
    rng = random.Random(7)
    start = server.memory()
    for _ in range(ROUNDS):
        _hostile_round(client, raw, rng)
    before = server.memory()
    for _ in range(ROUNDS):
        _hostile_round(client, raw, rng)
    after = server.memory()
    growth = after["VmRSS"] - before["VmRSS"]
    print(f"\nserver RSS {start['VmRSS'] >> 20} MiB at start, {before['VmRSS'] >> 20} MiB after "
          f"{ROUNDS} hostile rounds, {after['VmRSS'] >> 20} MiB after {ROUNDS} more "
          f"(+{growth / 2**20:.1f} MiB), peak {after['VmHWM'] >> 20} MiB")  # fmt: skip
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth >> 20} MiB: a leak?"
    assert_serving(server, client)
    g = client.generate("still here", gen_length=4, steps=2)
    assert g.text.startswith("still here")
    log = server.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
