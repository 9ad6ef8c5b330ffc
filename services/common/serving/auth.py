"""Bearer-token auth of mist servers: who may call, and who is calling inside a handler.

current_principal() -> object | None    who is calling, inside a handler: None with auth off; a Principal
                       (name) with the tokens-file validator; whatever a custom token_validator returned
Principal(name)        what the default validator returns
TokenValidator = Callable[[str | None, str], object | Awaitable[object]]
                       (bearer token or None, full method "/pkg.Service/Method") -> principal; raise
                       UnauthenticatedError / PermissionDeniedError to refuse (health, reflection are exempt)
StaticTokenValidator(tokens: Mapping[name, token]); load_tokens_file(path) -> dict[name, token]
bearer_token(metadata) -> str | None    the token of an `authorization: Bearer <token>` entry
AuthInterceptor(validator)              the server interceptor create_server installs
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_reflection.v1alpha import reflection

from services.common import errors
from services.common.config import ConfigError
from services.common.errors import MistError
from services.common.serving.rpc import clip_details, refusing_handler, status_for, wrap_handler

log = logging.getLogger(__name__)
_EXEMPT = (f"/{grpc_health.SERVICE_NAME}/", f"/{reflection.SERVICE_NAME}/", "/grpc.reflection.v1.ServerReflection/")

_principal: ContextVar[object | None] = ContextVar("mist_principal", default=None)
TokenValidator = Callable[[str | None, str], Any]
_BEARER = re.compile(r"^bearer\s+(\S+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name from the tokens file (logs and lineage use it)."""

    name: str


def current_principal() -> object | None:
    """The caller of the RPC this handler serves (each RPC runs in its own task, so this never leaks)."""
    return _principal.get()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; None when absent."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            match = _BEARER.match(text.strip())
            if match is None:
                raise errors.UnauthenticatedError("malformed authorization metadata: expected 'Bearer <token>'")
            return match.group(1)
    return None


def load_tokens_file(path: str | Path) -> dict[str, str]:
    """`name:token` per line ('#' comments and blank lines skipped) -> {name: token}. Never echoes a token."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or not name or not token or any(c.isspace() for c in token):
            raise ConfigError("auth_tokens_file", f"line {number}: expected 'name:token' with a non-empty token")
        if name in tokens:
            raise ConfigError("auth_tokens_file", f"line {number}: duplicate name {name!r}")
        if token in tokens.values():
            raise ConfigError("auth_tokens_file", f"line {number}: token of {name!r} is used by another name")
        tokens[name] = token
    if not tokens:
        raise ConfigError("auth_tokens_file", f"{path}: no tokens (leave the flag empty to turn auth off)")
    return tokens


class StaticTokenValidator:
    """Checks a bearer token against a fixed {name: token} set in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]

    def __call__(self, token: str | None, method: str) -> Principal:
        if token is None:
            raise errors.UnauthenticatedError("missing bearer token: send metadata 'authorization: Bearer <token>'")
        given = token.encode()
        found = None
        for name, known in self._tokens:  # compare with every token so timing says nothing about which matched
            if hmac.compare_digest(given, known):
                found = name
        if found is None:
            raise errors.UnauthenticatedError("unknown or revoked bearer token")
        return Principal(found)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Validates bearer tokens; health and reflection stay open for probes and grpcurl."""

    def __init__(self, validator: TokenValidator) -> None:
        self._validator = validator

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_EXEMPT):
            return handler
        try:
            principal = self._validator(bearer_token(details.invocation_metadata), details.method)
            if inspect.isawaitable(principal):
                principal = await principal
        except MistError as e:
            return refusing_handler(handler, status_for(e), clip_details(str(e)))
        except Exception as e:  # neither the message nor the traceback: they might quote the token
            log.error("token validator raised %s on %s", type(e).__name__, details.method)
            return refusing_handler(handler, grpc.StatusCode.INTERNAL, "authentication failed: internal error")

        @contextlib.asynccontextmanager
        async def as_principal(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            _principal.set(principal)  # set in this RPC's own task; no reset needed
            yield

        return wrap_handler(handler, as_principal)
