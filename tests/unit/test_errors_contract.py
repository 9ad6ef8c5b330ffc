"""The error table is one contract in two places: errors.ERRORS in the code and docs/reference/errors.md for users.
Both must say the same, and servers and clients must both derive their mapping from the code's table."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from services.common import errors
from services.common.clients.channel import domain_error
from services.common.serving.rpc import status_for

ERRORS_DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "errors.md"
_ROW = re.compile(r"^\|[^|]+\|\s*`([A-Z_]+)`\s*\|\s*`(\w+)`\s*\|\s*$")


class _Refused(grpc.RpcError):
    """What a gRPC call raises when the server answers with a status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def documented_rows() -> set[tuple[str, str]]:
    rows = {match.groups() for line in ERRORS_DOC.read_text().splitlines() if (match := _ROW.match(line))}
    assert len(rows) >= 10, "the table in docs/reference/errors.md was not found or changed its shape"
    return rows


def test_the_documented_table_is_the_code_table():
    # Assert: every (status code, exception) row of the docs is a class of errors.ERRORS and vice versa
    assert documented_rows() == {(cls.code, cls.__name__) for cls in errors.ERRORS}


@pytest.mark.parametrize("cls", errors.ERRORS, ids=lambda cls: cls.__name__)
def test_a_domain_error_crosses_the_wire_as_itself(cls):
    # Execute: server side (error -> status) then client side (status -> error)
    status = status_for(cls("refused for a reason"))
    received = domain_error(_Refused(status, "refused for a reason"), "registry: ")

    # Assert
    assert status.name == cls.code
    assert type(received) is cls and str(received) == "registry: refused for a reason"
    assert isinstance(received.__cause__, grpc.RpcError)


def test_a_status_outside_the_table_keeps_its_name_and_bugs_stay_internal():
    # Execute
    cancelled = domain_error(_Refused(grpc.StatusCode.CANCELLED, ""))

    # Assert
    assert type(cancelled) is errors.MistError and cancelled.code == "CANCELLED" and str(cancelled) == "CANCELLED"
    assert status_for(cancelled) == grpc.StatusCode.CANCELLED  # a worker passes an upstream status on as it came
    assert status_for(ValueError("a bug")) == grpc.StatusCode.INTERNAL
    assert status_for(errors.MistError("unclassified")) == grpc.StatusCode.INTERNAL
