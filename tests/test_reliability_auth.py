"""Auth and transport: bearer tokens on every RPC, compared in constant time, never logged; TLS
with certificates generated here. (tests/test_service_local.py::test_auth_and_tls_together
covers the basic accept / reject / plaintext-refused case on one RPC; these go further.)
"""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import socket
import subprocess
import textwrap
import time
from collections import namedtuple

import grpc
import pytest
from test_reliability_input import ServeProcess

from unmask.client import Client, ServiceError
from unmask.service import interceptors
from unmask.service.interceptors import AuthInterceptor
from unmask.service.server import ServerThread
from unmask.settings import Settings
from unmask.v1 import unmask_pb2 as pb

TOKEN = "tok-Rel1abil1ty-9f8e7d6c5b4a"  # distinctive: searched for in the server's logs
OTHER = "tok-second-0a1b2c3d"
WRONG = "tok-WRONG-guess-5e6f7a8b"  # a rejected token must not be logged either
SMALL = {"gen_length": 4, "steps": 2}
Details = namedtuple("Details", "method invocation_metadata")


# ---- certificates ---------------------------------------------------------------------------
def self_signed(directory, name: str = "localhost") -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for `name` and 127.0.0.1: with the `cryptography` package if
    it is installed, else with the openssl command."""
    try:
        return _with_cryptography(name)
    except ImportError:
        pass
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor openssl is available")
    key, cert = directory / f"{name}-key.pem", directory / f"{name}-cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


def _with_cryptography(name: str) -> tuple[bytes, bytes]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


# ---- constant-time comparison ----------------------------------------------------------------
def test_tokens_are_compared_with_hmac_compare_digest_and_nothing_else():
    source = textwrap.dedent(inspect.getsource(AuthInterceptor._allowed))
    assert "compare_digest" in source
    tree = ast.parse(source)
    secret_names = {"given", "token", "t", "_tokens"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):  # ==, !=, in, startswith-like shortcuts leak timing
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            assert not names & secret_names, f"a token compared with {ast.unparse(node)}"
    assert "startswith" not in source and "find(" not in source


@pytest.mark.parametrize(
    "header",
    [f"Bearer {TOKEN}", f"Bearer {OTHER}", f"Bearer {WRONG}", f"Bearer {TOKEN[:-1]}",
     f"Bearer {TOKEN}x", "Bearer x", f"Bearer {'y' * 4000}"],
)  # fmt: skip
def test_every_configured_token_is_compared_whichever_matches(monkeypatch, header):
    """No early exit: the number of comparisons says nothing about which token matched."""
    calls = []
    real = interceptors.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(interceptors.hmac, "compare_digest", counting)
    auth = AuthInterceptor([TOKEN, OTHER, "third-token"])
    allowed = auth._allowed(Details("/unmask.v1.Unmask/Generate", (("authorization", header),)))
    assert allowed == (header in (f"Bearer {TOKEN}", f"Bearer {OTHER}"))
    assert len(calls) == 3


# ---- every RPC is guarded -------------------------------------------------------------------
@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from unmask.models.generation import Generator

    return Generator.load(tiny_model_dir)


@pytest.fixture(scope="module")
def guarded(generator):
    settings = Settings(auth_tokens=(TOKEN, OTHER), max_batch_items=4)
    with ServerThread(settings, generator=generator) as srv:
        yield srv


def _every_call(c: Client) -> dict[str, object]:
    req = pb.GenerateRequest(prompt="x", params=pb.SamplerParams(**SMALL))
    return {
        "Generate": lambda: c.run(req),
        "GenerateStream": lambda: list(c.run_stream(req)),
        "SubmitBatch": lambda: c.submit_batch([{"custom_id": "a", "body": {"prompt": "x"}}]),
        "GetJob": lambda: c.get_batch("batch_x"),
        "ListJobs": lambda: c.list_batches(),
        "CancelJob": lambda: c.cancel_batch("batch_x"),
        "StreamJobResults": lambda: list(c.batch_results("batch_x")),
        "ListModels": lambda: c.list_models(),
        "GetModel": lambda: c.get_model(),
    }


def test_the_list_of_calls_covers_every_rpc(guarded):
    with Client(f"127.0.0.1:{guarded.port}") as c:
        assert set(_every_call(c)) == set(pb.DESCRIPTOR.services_by_name["Unmask"].methods_by_name)


BAD_CREDENTIALS = [
    None,  # no authorization metadata at all
    WRONG,
    TOKEN[:-1],  # a prefix of a real token
    TOKEN + "x",  # a real token with a suffix
    TOKEN.upper(),
    "x" * 7000,  # long (just under grpc's metadata limit)
]


@pytest.mark.parametrize("token", BAD_CREDENTIALS, ids=lambda t: "none" if t is None else t[:12])
def test_every_rpc_refuses_a_missing_or_wrong_token_before_any_work(guarded, token):
    with Client(f"127.0.0.1:{guarded.port}", token=token, timeout=10) as c:
        for name, call in _every_call(c).items():
            with pytest.raises(ServiceError) as err:
                call()
            assert err.value.code == "UNAUTHENTICATED", (name, err.value)
            assert "token" in err.value.message and (token is None or token not in str(err.value))
        assert c.health() == "SERVING"  # probes need no token
    dispatcher = guarded.server.dispatcher
    assert not dispatcher._jobs and dispatcher._engine.load == 0, "a refused call started a job"
    assert guarded.call(guarded.server.store.list(0, 10)) == [], "a refused call made a batch"


@pytest.mark.parametrize(
    "metadata",
    [(("authorization", TOKEN),),  # no scheme
     (("authorization", f"Basic {TOKEN}"),),
     (("authorization", "Bearer"),), (("authorization", "Bearer "),),
     (("authorization-bin", TOKEN.encode()),), (("x-api-key", TOKEN),),
     (("authorization", f"Token {TOKEN}"),)],
    ids=["no-scheme", "basic", "empty", "blank", "binary-header", "other-header", "token-scheme"],
)  # fmt: skip
def test_malformed_authorization_headers_are_unauthenticated(guarded, metadata):
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as ch:
        call = ch.unary_unary("/unmask.v1.Unmask/ListModels",
                              request_serializer=pb.ListModelsRequest.SerializeToString,
                              response_deserializer=pb.ListModelsResponse.FromString)  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call(pb.ListModelsRequest(), metadata=metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_either_configured_token_and_a_case_insensitive_scheme_are_accepted(guarded):
    for header in (f"Bearer {TOKEN}", f"bearer {OTHER}", f"BEARER {TOKEN}"):
        with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as ch:
            call = ch.unary_unary("/unmask.v1.Unmask/ListModels",
                                  request_serializer=pb.ListModelsRequest.SerializeToString,
                                  response_deserializer=pb.ListModelsResponse.FromString)  # fmt: skip
            assert call(pb.ListModelsRequest(), metadata=(("authorization", header),), timeout=10)


def test_an_oversized_authorization_header_is_refused_by_grpc(guarded):
    with Client(f"127.0.0.1:{guarded.port}", token="x" * 20_000, timeout=10) as c:
        with pytest.raises(ServiceError) as err:
            c.list_models()
    assert err.value.code in ("RESOURCE_EXHAUSTED", "UNAUTHENTICATED")
    with Client(f"127.0.0.1:{guarded.port}", token=TOKEN) as c:
        assert c.list_models()  # and the server carries on


def test_unauthenticated_garbage_is_still_unauthenticated(guarded):
    """The message is not even parsed for a caller without a valid token."""
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as ch:
        call = ch.unary_unary("/unmask.v1.Unmask/GetJob", request_serializer=None,
                              response_deserializer=None)  # fmt: skip
        for metadata in ((), (("authorization", f"Bearer {WRONG}"),)):
            with pytest.raises(grpc.RpcError) as err:
                call(b"\xff\xff\xff\xff", metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- TLS + auth in a real `unmask serve`, and its logs ---------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    key, cert = self_signed(d)
    (d / "key.pem").write_bytes(key)
    (d / "cert.pem").write_bytes(cert)
    _, other_cert = self_signed(d, "impostor")
    return {"key": d / "key.pem", "cert": d / "cert.pem", "other": other_cert}


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, tmp_path_factory, certs):
    log = tmp_path_factory.mktemp("serve-tls") / "serve.log"
    env = {  # secrets through the environment, never on the command line (ps shows that)
        "UNMASK_AUTH_TOKENS": f"{TOKEN},{OTHER}",
        "UNMASK_TLS_CERT": str(certs["cert"]),
        "UNMASK_TLS_KEY": str(certs["key"]),
    }
    srv = ServeProcess(tiny_model_dir, log, env).start("--log-level", "DEBUG")
    try:
        with Client(f"127.0.0.1:{srv.port}", root_certificates=certs["cert"]) as c:
            c.wait_ready(timeout=120)
        yield srv
    finally:
        srv.stop()


def test_tls_with_a_generated_certificate_and_a_token(tls_server, certs):
    target = f"127.0.0.1:{tls_server.port}"
    with Client(target, token=TOKEN, root_certificates=certs["cert"], timeout=30) as c:
        assert c.generate("over tls", **SMALL).text.startswith("over tls")
        assert [e["type"] for e in c.stream("tls", **SMALL)][-1] == "final"
        assert c.get_model().ready
        with pytest.raises(ServiceError) as err:  # a caller mistake, with a token, over TLS
            c.generate("x", gen_length=4, steps=9)
        assert err.value.code == "INVALID_ARGUMENT"
    with Client(target, token=OTHER, root_certificates=certs["cert"], server_name="localhost",
                timeout=30) as c:  # fmt: skip
        assert c.list_models()
    with Client(target, root_certificates=certs["cert"], timeout=10) as c:
        with pytest.raises(ServiceError) as err:
            c.list_models()
        assert err.value.code == "UNAUTHENTICATED"
    with Client(target, token=WRONG, root_certificates=certs["cert"], timeout=10) as c:
        with pytest.raises(ServiceError) as err:
            c.generate("x", **SMALL)
        assert err.value.code == "UNAUTHENTICATED"


@pytest.mark.parametrize("case", ["untrusted-certificate", "wrong-server-name", "plaintext"])
def test_a_client_that_cannot_verify_the_server_gets_no_connection(tls_server, certs, case):
    target = f"127.0.0.1:{tls_server.port}"
    kwargs = {
        "untrusted-certificate": {"root_certificates": certs["other"]},
        "wrong-server-name": {"root_certificates": certs["cert"], "server_name": "elsewhere"},
        "plaintext": {},
    }[case]
    t0 = time.monotonic()
    with Client(target, token=TOKEN, timeout=5, **kwargs) as c:
        with pytest.raises(ServiceError) as err:
            c.list_models()
    assert err.value.code == "UNAVAILABLE", err.value
    assert time.monotonic() - t0 < 10
    if case == "plaintext":  # say what to do, not only "Socket closed"
        assert "--ca" in err.value.message, err.value.message


@pytest.mark.parametrize("case", ["missing-cert", "key-of-another-cert", "port-in-use"])
def test_serve_start_up_mistakes_are_one_line_and_exit_2(tiny_model_dir, certs, tmp_path, case):
    """What `unmask serve` says when it cannot start, instead of a traceback."""
    import socket
    import subprocess
    import sys

    env = {**os.environ, "UNMASK_MODEL": str(tiny_model_dir), "UNMASK_AUTH_TOKENS": ""}
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    args = [sys.executable, "-m", "unmask", "serve", "--host", "127.0.0.1", "--port", str(port)]
    busy = socket.socket()
    if case == "missing-cert":
        args += ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(certs["key"])]
        says = "tls_cert: cannot read"
    elif case == "key-of-another-cert":
        impostor_key, _ = self_signed(tmp_path, "impostor")
        (tmp_path / "k.pem").write_bytes(impostor_key)
        args += ["--tls-cert", str(certs["cert"]), "--tls-key", str(tmp_path / "k.pem")]
        says = "tls_key: the key does not match the certificate"
    else:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args[-1] = str(busy.getsockname()[1])
        says = "port: cannot listen on"
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_junk_on_the_tls_port_does_not_hurt_the_server(tls_server, certs):
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\xff\xff" + b"\0" * 100,
                 b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", bytes(range(256)) * 40):  # fmt: skip
        with socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(2)
            try:
                s.recv(1024)
            except OSError:
                pass
    with Client(f"127.0.0.1:{tls_server.port}", token=TOKEN, root_certificates=certs["cert"]) as c:
        assert c.health() == "SERVING" and c.list_models()


def test_tokens_never_reach_the_logs(tls_server, certs):
    """Runs after the calls above (authenticated, refused, failing); then a few more."""
    target = f"127.0.0.1:{tls_server.port}"
    for token in (TOKEN, WRONG, OTHER, None):
        with Client(target, token=token, root_certificates=certs["cert"], timeout=30) as c:
            try:
                c.generate("log me", **SMALL)
                c.submit_batch([{"custom_id": "a", "body": {"prompt": "x", "params": SMALL}}])
                list(c.stream("x", **SMALL))
                c.get_batch("batch_missing")
            except ServiceError:
                pass
    assert tls_server.stop() == 0
    log = tls_server.log()
    assert "request_id=" in log and "UNAUTHENTICATED" in log and "Generate OK" in log, log[-3000:]
    for secret in (TOKEN, OTHER, WRONG, TOKEN[4:16]):
        assert secret not in log, f"{secret!r} is in the server log"
    assert "Bearer" not in log and "authorization" not in log.lower()
