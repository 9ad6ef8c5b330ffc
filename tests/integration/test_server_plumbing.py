"""The shared gRPC plumbing against real servers on 127.0.0.1 port 0: health, reflection, error table, size
limits, auth, TLS / mTLS, metrics, retries, concurrency limit, and the SIGTERM drain of a real process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common import errors
from services.common.clients.channel import (
    create_aio_channel,
    create_channel,
    health_check,
    health_check_async,
    wait_for_ready,
    wait_for_ready_async,
)
from services.common.config import ConfigError, ServerConfig
from services.common.logging_setup import TextFormatter, redact
from services.common.serving.auth import Principal
from services.common.serving.metrics import BindError, GrpcMetrics, new_metrics_registry, start_metrics_server
from services.common.serving.rpc import handles_errors, status_for
from services.common.serving.server import ServiceSetup, create_server, serve
from tests.helpers.certs import CertPaths, make_certs
from tests.helpers.plumbing_server import FAKE_SECRET, SERVICE, Plumbing, add_plumbing

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-Zq9x7Lw2PpV4"  # the test greps logs for it
NO_RETRY: tuple = ()


@contextlib.asynccontextmanager
async def running(
    config: ServerConfig | None = None, plumbing: Plumbing | None = None, **kwargs
) -> AsyncIterator[tuple[int, object]]:
    """A started server with the plumbing service; stopped when the block ends."""
    config = config or ServerConfig(metrics_listen="off")
    server, port, health = await create_server(config, functools.partial(add_plumbing, plumbing=plumbing), **kwargs)
    try:
        yield port, health
    finally:
        await server.stop(0)


async def call(channel: grpc.aio.Channel, method: str, request: bytes = b"", **kwargs) -> bytes:
    return await channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=5, **kwargs)


async def code_of(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------- health, reflection


def test_health_overall_and_per_service_serving() -> None:
    async def scenario() -> tuple[str, str, str]:
        async with running() as (port, _):
            target = f"127.0.0.1:{port}"
            return (
                await health_check_async(target),
                await health_check_async(target, SERVICE),
                await health_check_async(target, "mist.v1.Nope"),
            )

    overall, service, unknown = run(scenario())

    assert (overall, service, unknown) == ("SERVING", "SERVING", "SERVICE_UNKNOWN")


def test_reflection_lists_registered_services() -> None:
    async def scenario() -> set[str]:
        async with running() as (port, _), create_aio_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for response in stub.ServerReflectionInfo(iter([request])):
                return {s.name for s in response.list_services_response.service}
        return set()

    names = run(scenario())

    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_set_serving_flips_one_service() -> None:
    async def scenario() -> tuple[str, str]:
        async with running() as (port, health):
            await health.set_serving(SERVICE, False)
            target = f"127.0.0.1:{port}"
            return await health_check_async(target, SERVICE), await health_check_async(target)

    assert run(scenario()) == ("NOT_SERVING", "SERVING")


# ---------------------------------------------------------------------------------------------- error table


def test_table_agrees_with_error_classes() -> None:
    domain = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.MistError)}

    assert set(errors.ERRORS) == domain - {errors.MistError}
    assert {cls: status_for(cls("x")).name for cls in errors.ERRORS} == {cls: cls.code for cls in errors.ERRORS}
    assert {cls: errors.error_for_code(cls.code, "x").__class__ for cls in errors.ERRORS} == {
        c: c for c in errors.ERRORS
    }


@pytest.mark.parametrize("error", sorted(errors.ERRORS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_mist_error_maps_to_its_code(error: type[errors.MistError]) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with running() as (port, _), create_aio_channel(f"127.0.0.1:{port}", retried_methods=NO_RETRY) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch, "Raise", error.__name__.encode())
            return info.value

    rpc_error = run(scenario())

    assert rpc_error.code() == grpc.StatusCode[error.code]
    assert rpc_error.details() == f"{error.__name__} raised on purpose"


def test_unexpected_exception_is_internal_without_leak(caplog) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with running() as (port, _), create_aio_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch, "Raise", b"KeyboardInterruptNot")
            return info.value

    rpc_error = run(scenario())

    incident = re.fullmatch(
        r"internal error \(incident ([0-9a-f]{8})\); the server log has details", rpc_error.details()
    )
    assert rpc_error.code() == grpc.StatusCode.INTERNAL
    assert incident is not None
    assert FAKE_SECRET not in rpc_error.details() and "RuntimeError" not in rpc_error.details()
    logged = [r for r in caplog.records if incident.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the traceback is in the server log


def test_streaming_shapes_map_errors() -> None:
    async def scenario() -> tuple:
        async with running() as (port, _), create_aio_channel(f"127.0.0.1:{port}") as ch:
            received, count_call = [], ch.unary_stream(f"/{SERVICE}/Count")(b"3:NotFoundError", timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as count_error:
                async for item in count_call:
                    received.append(item)
            total = await ch.stream_unary(f"/{SERVICE}/Sum")(iter([b"ab", b"cde"]), timeout=5)
            sum_code = await code_of(ch.stream_unary(f"/{SERVICE}/Sum")(iter([b"a", b"raise:DataLossError"])))
            chat, echoed = ch.stream_stream(f"/{SERVICE}/Chat")(iter([b"hi", b"raise:AbortedError"])), []
            with pytest.raises(grpc.aio.AioRpcError) as chat_error:
                async for item in chat:
                    echoed.append(item)
            return received, count_error.value.code(), total, sum_code, echoed, chat_error.value.code()

    received, count_code, total, sum_code, echoed, chat_code = run(scenario())

    assert received == [b"0", b"1", b"2"] and count_code == grpc.StatusCode.NOT_FOUND
    assert total == b"5" and sum_code == grpc.StatusCode.DATA_LOSS
    assert echoed == [b"hi"] and chat_code == grpc.StatusCode.ABORTED


def test_handles_errors_refuses_sync_functions() -> None:
    def not_async(request: bytes, context: object) -> bytes:
        return request

    with pytest.raises(TypeError, match="async functions or async generators"):
        handles_errors(not_async)


# ---------------------------------------------------------------------------------------------- limits


def test_message_over_limit_is_resource_exhausted() -> None:
    config = ServerConfig(metrics_listen="off", max_message_bytes=1024)

    async def scenario() -> tuple[bytes, grpc.StatusCode]:
        async with running(config) as (port, _), create_aio_channel(f"127.0.0.1:{port}") as ch:
            small = await call(ch, "Echo", b"x" * 1000)
            return small, await code_of(call(ch, "Echo", b"x" * 2048))

    small, big_code = run(scenario())

    assert small == b"x" * 1000
    assert big_code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_concurrency_limit_refuses_with_resource_exhausted_but_not_health() -> None:
    config = ServerConfig(metrics_listen="off", max_concurrent_rpcs=1)

    async def scenario() -> tuple:
        async with running(config) as (port, health), create_aio_channel(f"127.0.0.1:{port}") as ch:
            slow = asyncio.ensure_future(call(ch, "Sleep", b"0.5"))
            while health.in_flight == 0:
                await asyncio.sleep(0.01)
            second = await code_of(call(ch, "Echo", b"x"))
            status = await health_check_async(f"127.0.0.1:{port}")
            return second, status, await slow

    second, status, slow = run(scenario())

    assert second == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status == "SERVING"
    assert slow == b"slept"


def test_retry_policy_retries_unavailable_only_for_listed_methods() -> None:
    plumbing, listed = Plumbing(), ((SERVICE, "Flaky"),)

    async def scenario() -> tuple:
        async with running(plumbing=plumbing) as (port, _):
            async with create_aio_channel(f"127.0.0.1:{port}", retried_methods=listed) as ch:
                retried = await call(ch, "Flaky", b"a:2")
            async with create_aio_channel(f"127.0.0.1:{port}", retried_methods=NO_RETRY) as ch:
                not_retried = await code_of(call(ch, "Flaky", b"b:2"))
            return retried, not_retried

    retried, not_retried = run(scenario())

    assert retried == b"ok 3"  # two UNAVAILABLE answers, then success, inside one call
    assert not_retried == grpc.StatusCode.UNAVAILABLE
    assert plumbing.flaky_attempts == {"a": 3, "b": 1}


def test_second_server_on_same_port_fails_clearly() -> None:
    async def scenario() -> str:
        async with running() as (port, _):
            with pytest.raises(BindError) as info:
                await create_server(ServerConfig(listen=f"127.0.0.1:{port}", metrics_listen="off"), add_plumbing)
            return str(info.value)

    message = run(scenario())

    assert re.fullmatch(
        r"cannot listen on 127\.0\.0\.1:\d+ \(--listen / MIST_LISTEN\): address in use or not "
        r"available on this host",
        message,
    )


def test_wait_for_ready_connects_or_times_out() -> None:
    def blocking(port: int) -> None:
        with create_channel(f"127.0.0.1:{port}") as channel:
            wait_for_ready(channel, 5)

    async def scenario() -> tuple:
        async with running() as (port, _):
            async with create_aio_channel(f"127.0.0.1:{port}") as ch:
                await wait_for_ready_async(ch, 5)
                connected = ch.get_state() == grpc.ChannelConnectivity.READY
            await asyncio.to_thread(blocking, port)
        async with create_aio_channel(f"127.0.0.1:{port}") as ch:  # the server is gone now
            with pytest.raises(TimeoutError, match=r"channel not ready after 0.3s"):
                await wait_for_ready_async(ch, 0.3)
        return connected

    assert run(scenario()) is True


# ---------------------------------------------------------------------------------------------- auth


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text(f"# operators\ndevice-1:{TOKEN}\n\nadmin:other-token-123\n")
    return path


def test_bearer_token_auth(tokens_file: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    config = ServerConfig(metrics_listen="off", auth_tokens_file=str(tokens_file))

    async def scenario() -> dict:
        async with running(config) as (port, _):
            target, out = f"127.0.0.1:{port}", {}
            async with create_aio_channel(target) as ch:
                out["none"] = await code_of(call(ch, "Echo", b"x"))
                out["health"] = await health_check_async(target)
                out["reflection"] = await code_of(
                    reflection_pb2_grpc.ServerReflectionStub(ch)
                    .ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                    .read()
                )
            async with create_aio_channel(target, token=TOKEN + "x") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as wrong:
                    await call(ch, "Echo", b"x")
                out["wrong"] = (wrong.value.code(), wrong.value.details())
                out["malformed"] = await code_of(call(ch, "Echo", metadata=(("authorization", "Basic abc"),)))
            async with create_aio_channel(target, token=TOKEN) as ch:
                out["right"] = await call(ch, "WhoAmI")
                out["stream"] = [item async for item in ch.unary_stream(f"/{SERVICE}/Count")(b"2")]
            return out

    out = run(scenario())

    assert out["none"] == grpc.StatusCode.UNAUTHENTICATED
    assert out["wrong"] == (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked bearer token")
    assert out["malformed"] == grpc.StatusCode.UNAUTHENTICATED
    assert out["right"] == repr(Principal("device-1")).encode()
    assert out["stream"] == [b"0", b"1"]
    assert out["health"] == "SERVING" and out["reflection"] == grpc.StatusCode.OK
    assert caplog.records  # something was logged, and none of it holds the token
    assert TOKEN not in caplog.text


def test_custom_async_validator_and_permission_denied(caplog) -> None:
    seen: list[tuple[str | None, str]] = []

    async def validator(token: str | None, method: str) -> dict:
        seen.append((token, method))
        if token == "boom":
            raise RuntimeError(f"db error while checking {token}")
        if method.endswith("/Echo"):
            raise errors.PermissionDeniedError("token lacks the write scope")
        return {"task": "cats", "scope": "read"}

    async def scenario() -> tuple:
        async with running(token_validator=validator) as (port, _):
            async with create_aio_channel(f"127.0.0.1:{port}", token="t1") as ch:
                who = await call(ch, "WhoAmI")
                denied = await code_of(call(ch, "Echo"))
            async with create_aio_channel(f"127.0.0.1:{port}", token="boom") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as broken:
                    await call(ch, "WhoAmI")
            return who, denied, broken.value

    who, denied, broken = run(scenario())

    assert who == repr({"task": "cats", "scope": "read"}).encode()
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    assert (broken.code(), broken.details()) == (grpc.StatusCode.INTERNAL, "authentication failed: internal error")
    assert "boom" not in caplog.text and "token validator raised RuntimeError" in caplog.text
    assert seen[0] == ("t1", f"/{SERVICE}/WhoAmI")


def test_sync_client_with_token_and_health_check(tokens_file: Path) -> None:
    config = ServerConfig(metrics_listen="off", auth_tokens_file=str(tokens_file))

    def blocking_client(port: int) -> tuple[bytes, str]:
        with create_channel(f"127.0.0.1:{port}", token=TOKEN) as channel:
            who = channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"", timeout=5)
            chat = list(channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"a", b"b"]), timeout=5))
        return who, chat, health_check(f"127.0.0.1:{port}", SERVICE)

    async def scenario() -> tuple:
        async with running(config) as (port, _):
            return await asyncio.to_thread(blocking_client, port)

    who, chat, status = run(scenario())

    assert who == repr(Principal("device-1")).encode()
    assert chat == [b"a", b"b"]
    assert status == "SERVING"


def test_bad_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    path.write_text(f"device-1 {TOKEN}\n")

    with pytest.raises(errors.InvalidArgumentError) as info:
        run(create_server(ServerConfig(metrics_listen="off", auth_tokens_file=str(path)), add_plumbing))

    assert str(info.value) == (
        "--auth-tokens-file (env MIST_AUTH_TOKENS_FILE): line 1: expected 'name:token' with a non-empty token"
    )


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_and_plaintext_client_refused(certs: CertPaths) -> None:
    config = ServerConfig(metrics_listen="off", tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))

    async def scenario() -> tuple:
        async with running(config) as (port, _):
            target = f"127.0.0.1:{port}"
            async with create_aio_channel(target, tls_ca=certs.ca) as ch:
                secure = await call(ch, "Echo", b"over tls")
            async with create_aio_channel(target, retried_methods=NO_RETRY) as ch:
                plain = await code_of(call(ch, "Echo", b"x"))
            return secure, plain, await health_check_async(target, tls_ca=certs.ca)

    secure, plain, status = run(scenario())

    assert secure == b"over tls"
    assert plain == grpc.StatusCode.UNAVAILABLE
    assert status == "SERVING"


def test_mutual_tls_requires_a_trusted_client_certificate(certs: CertPaths) -> None:
    config = ServerConfig(
        metrics_listen="off",
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca),
    )

    async def scenario() -> tuple:
        async with running(config) as (port, _):
            target = f"127.0.0.1:{port}"
            async with create_aio_channel(target, tls_ca=certs.ca, retried_methods=NO_RETRY) as ch:
                without = await code_of(call(ch, "Echo", b"x"))
            async with create_aio_channel(
                target,
                tls_ca=certs.ca,
                client_cert=certs.rogue_client_cert,
                client_key=certs.rogue_client_key,
                retried_methods=NO_RETRY,
            ) as ch:
                rogue = await code_of(call(ch, "Echo", b"x"))
            async with create_aio_channel(
                target, tls_ca=certs.ca, client_cert=certs.client_cert, client_key=certs.client_key, token=TOKEN
            ) as ch:
                with_cert = await call(ch, "Echo", b"mtls")
            return without, rogue, with_cert

    without, rogue, with_cert = run(scenario())

    assert without == grpc.StatusCode.UNAVAILABLE
    assert rogue == grpc.StatusCode.UNAVAILABLE
    assert with_cert == b"mtls"


def test_token_rides_on_tls_call_credentials(certs: CertPaths, tokens_file: Path) -> None:
    config = ServerConfig(
        metrics_listen="off",
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        auth_tokens_file=str(tokens_file),
    )

    async def scenario() -> bytes:
        async with (
            running(config) as (port, _),
            create_aio_channel(f"127.0.0.1:{port}", tls_ca=certs.ca, token=TOKEN) as ch,
        ):
            return await call(ch, "WhoAmI")

    assert run(scenario()) == repr(Principal("device-1")).encode()


def test_client_cert_without_key_is_rejected(certs: CertPaths) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="client_cert and client_key go together"):
        create_channel("127.0.0.1:1", tls_ca=certs.ca, client_cert=certs.client_cert)


def test_tls_files_without_pem_fail_before_binding(tmp_path: Path, certs: CertPaths) -> None:
    garbage = tmp_path / "server.crt"
    garbage.write_text("not a certificate")
    config = ServerConfig(metrics_listen="off", tls_cert=str(garbage), tls_key=str(certs.server_key))

    with pytest.raises(ConfigError) as info:
        run(create_server(config, add_plumbing))

    assert str(info.value) == f"--tls-cert (env MIST_TLS_CERT): {str(garbage)!r} holds no PEM CERTIFICATE block"


# ---------------------------------------------------------------------------------------------- metrics


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_endpoint_counts_calls_by_code() -> None:
    registry = new_metrics_registry()
    metrics = GrpcMetrics(registry, "mist_test")

    async def scenario() -> str:
        async with running(metrics=metrics) as (port, _), create_aio_channel(f"127.0.0.1:{port}") as ch:
            await call(ch, "Echo", b"x")
            await call(ch, "Echo", b"y")
            await code_of(call(ch, "Raise", b"NotFoundError"))
        stop, metrics_port = start_metrics_server("127.0.0.1:0", registry)
        try:
            return await asyncio.to_thread(_scrape, metrics_port)
        finally:
            stop()

    text = run(scenario())

    assert f'mist_test_grpc_requests_total{{code="OK",method="/{SERVICE}/Echo"}} 2.0' in text
    assert f'mist_test_grpc_requests_total{{code="NOT_FOUND",method="/{SERVICE}/Raise"}} 1.0' in text
    assert f'mist_test_grpc_request_duration_seconds_count{{method="/{SERVICE}/Echo"}} 2.0' in text
    assert f'mist_test_grpc_requests_in_flight{{method="/{SERVICE}/Echo"}} 0.0' in text
    assert "process_cpu_seconds_total" in text and "python_info" in text


def test_metrics_server_port_zero_off_and_busy() -> None:
    registry = CollectorRegistry()
    stop, port = start_metrics_server("127.0.0.1:0", registry)
    try:
        off_stop, off_port = start_metrics_server("off", registry)
        with pytest.raises(BindError, match=r"cannot serve metrics on 127\.0\.0\.1:\d+ \(--metrics-listen"):
            start_metrics_server(f"127.0.0.1:{port}", registry)
    finally:
        stop()

    assert port > 0
    assert off_port is None and off_stop() is None


def test_serve_reports_bind_failure_with_exit_code_1(capsys) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    async def scenario() -> int:
        async with running() as (port, _):
            config = ServerConfig(listen=f"127.0.0.1:{port}", metrics_listen="off")
            return await serve(config, _setup_plumbing, service_name="mist-plumbing")

    try:
        code = run(scenario())
    finally:
        root.handlers[:], root.level = handlers, level

    assert code == 1
    assert re.search(
        r"ERROR services\.common\.serving\.server: mist-plumbing failed to start: cannot listen on "
        r"127\.0\.0\.1:\d+ \(--listen / MIST_LISTEN\)",
        capsys.readouterr().err,
    )


async def _setup_plumbing(config: ServerConfig, registry: CollectorRegistry) -> ServiceSetup:
    return ServiceSetup(add_services=add_plumbing)


# ---------------------------------------------------------------------------------------------- SIGTERM drain

_LISTENING = re.compile(r"mist-plumbing listening on 127\.0\.0\.1:(\d+) \(metrics on 127\.0\.0\.1:(\d+)\)$")


def _start_process(*flags: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIST_", "GRPC_TRACE", "GRPC_VERBOSITY"))}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.helpers.plumbing_server",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            *flags,
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(proc: subprocess.Popen, timeout_s: float = 20.0) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not lines:
        raise AssertionError(f"no log line from the server within {timeout_s}s")
    return lines[0].rstrip("\n")


async def _wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _sleep_in_flight(metrics_port: int):
    async def check() -> bool:
        text = await asyncio.to_thread(_scrape, metrics_port)
        return f'mist_plumbing_grpc_requests_in_flight{{method="/{SERVICE}/Sleep"}} 1.0' in text

    return check


def test_sigterm_drains_in_flight_calls_and_exits_0() -> None:
    proc = _start_process("--grace-s", "5")
    try:
        first = _first_line(proc)
        match = _LISTENING.search(first)
        assert match is not None, first
        target, metrics_port = f"127.0.0.1:{match.group(1)}", int(match.group(2))

        async def not_serving() -> bool:
            return await health_check_async(target) == "NOT_SERVING"

        async def scenario() -> tuple:
            async with create_aio_channel(target, retried_methods=NO_RETRY) as ch:
                slow = asyncio.ensure_future(call(ch, "Sleep", b"1.5"))
                await _wait_until(_sleep_in_flight(metrics_port))
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                await _wait_until(not_serving)
                refused = await code_of(call(ch, "Echo", b"x"))
                return await slow, refused, sent

        slow, refused, sent = run(scenario())
        exit_code = proc.wait(timeout=10)
        exited_after_s = time.monotonic() - sent
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()

    assert slow == b"slept"
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert exit_code == 0 and exited_after_s < 5
    order = [
        rest.index(s)
        for s in ("building the plumbing service", "received SIGTERM", "on_shutdown hook ran", "mist-plumbing stopped")
    ]
    assert order == sorted(order)


def test_grace_period_bounds_the_drain_json_logs() -> None:
    proc = _start_process("--grace-s", "0.5", "--log-format", "json")
    try:
        first = json.loads(_first_line(proc))
        match = _LISTENING.search(first["message"])
        target, metrics_port = f"127.0.0.1:{match.group(1)}", int(match.group(2))

        async def scenario() -> tuple:
            async with create_aio_channel(target, retried_methods=NO_RETRY) as ch:
                slow = asyncio.ensure_future(code_of(call(ch, "Sleep", b"30")))
                await _wait_until(_sleep_in_flight(metrics_port))
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                return await slow, sent

        code, sent = run(scenario())
        exit_code = proc.wait(timeout=10)
        exited_after_s = time.monotonic() - sent
        rest = [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()

    assert (first["level"], first["logger"]) == ("INFO", "services.common.serving.server")
    assert code == grpc.StatusCode.UNAVAILABLE  # cancelled by the server: clients retry elsewhere
    assert exit_code == 0 and 0.5 <= exited_after_s < 3
    assert "cancelling 1 call(s) still in flight after the grace period" in [r["message"] for r in rest]


# ---------------------------------------------------------------------------------------------- logging


def test_bearer_tokens_are_redacted_from_log_lines() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "headers: %s", (f"authorization: Bearer {TOKEN}",), None)

    line = TextFormatter().format(record)

    assert redact(f"BEARER {TOKEN}, next") == "BEARER ***, next"
    assert TOKEN not in line and line.endswith("INFO x: headers: authorization: Bearer ***")
