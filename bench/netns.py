"""Two network namespaces joined by a veth pair, rate-limited with `tc qdisc tbf`: an edge link on one machine.

    with EdgeLink.create() as link:                       # needs root (CAP_NET_ADMIN); BenchSkipped otherwise
        link.set_rate(10)                                 # tbf at 10 Mbit/s on both ends; None removes it
        server = ServerProcess(..., listen=f"{link.server_address}:0", prefix=link.exec_prefix("server"))

Everything lives inside the two namespaces: the veth pair is created there, its /30 is private to them, nothing
touches the host's interfaces or routes. Deleting the namespaces removes the veth pair with them. Namespace names
carry our PID, so concurrent runs never collide, and a run that was killed outright is cleaned up by the next.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bench.common import BenchError, BenchSkipped

Side = Literal["server", "client"]
NAME_PREFIX = "mistbench-"
DEFAULT_SUBNET = "10.203.74.0/30"  # any private /30: it exists only inside our two namespaces
_IP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class TbfShape:
    """`tc qdisc ... tbf` settings of one link rate (the same on both ends)."""

    rate_mbit: float  # the token rate: the link's bandwidth
    burst_kbit: int = 32  # bucket size: how much may leave at line speed after an idle spell
    latency_ms: int = 400  # longest a packet may queue before tbf drops it (sets the queue length)

    def tc_args(self) -> list[str]:
        return [
            "tbf",
            "rate",
            f"{self.rate_mbit:g}mbit",
            "burst",
            f"{self.burst_kbit}kbit",
            "latency",
            f"{self.latency_ms}ms",
        ]


def _ip(*args: str) -> str:
    """Run `ip ARGS`; BenchError with ip's own message when it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    if result.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces a previous run of ours left behind (killed with SIGKILL); returns their names."""
    removed = []
    try:
        listing = json.loads(_ip("-j", "netns", "list") or "[]")
    except (BenchError, json.JSONDecodeError, OSError):
        return removed
    for entry in listing:
        name = entry.get("name", "")
        owner = name.removeprefix(NAME_PREFIX).split("-", 1)[0]
        if name.startswith(NAME_PREFIX) and owner.isdigit() and not _pid_alive(int(owner)):
            try:
                _ip("netns", "delete", name)
                removed.append(name)
            except BenchError:
                pass
    return removed


class EdgeLink:
    """A server namespace and a client namespace, one veth pair between them, addresses .1 (server) and .2."""

    def __init__(self, subnet: str = DEFAULT_SUBNET) -> None:
        network = ipaddress.ip_network(subnet)
        if network.prefixlen != 30 or not network.is_private:
            raise BenchError(f"the edge link needs a private /30, got {subnet}")
        hosts = list(network.hosts())
        self.server_address, self.client_address = str(hosts[0]), str(hosts[1])
        self._prefixlen = network.prefixlen
        self.namespaces: dict[Side, str] = {
            "server": f"{NAME_PREFIX}{os.getpid()}-srv",
            "client": f"{NAME_PREFIX}{os.getpid()}-cli",
        }
        self.devices: dict[Side, str] = {"server": "veth-srv", "client": "veth-cli"}
        self.shape: TbfShape | None = None
        self._created: list[str] = []

    @classmethod
    def create(cls, subnet: str = DEFAULT_SUBNET) -> EdgeLink:
        """Build the link; BenchSkipped (saying why) where this machine cannot, with nothing left behind."""
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise BenchSkipped("the edge-link benchmark needs iproute2 (`ip`, `tc`): run `make system-deps`")
        if os.geteuid() != 0:
            raise BenchSkipped("the edge-link benchmark needs root (CAP_NET_ADMIN) to create network namespaces")
        remove_stale_namespaces()
        link = cls(subnet)
        try:
            link._build()
        except BenchError as error:
            link.close()
            raise BenchSkipped(f"cannot build the namespaces and veth pair here: {error}") from None
        except BaseException:
            link.close()
            raise
        return link

    def _build(self) -> None:
        server_ns, client_ns = self.namespaces["server"], self.namespaces["client"]
        for ns in (server_ns, client_ns):
            _ip("netns", "add", ns)
            self._created.append(ns)
        # Created inside the server namespace with its peer placed straight into the client's: never in the host's.
        _ip(
            "-n",
            server_ns,
            "link",
            "add",
            self.devices["server"],
            "type",
            "veth",
            "peer",
            "name",
            self.devices["client"],
            "netns",
            client_ns,
        )
        for side, address in (("server", self.server_address), ("client", self.client_address)):
            ns, dev = self.namespaces[side], self.devices[side]
            _ip("-n", ns, "addr", "add", f"{address}/{self._prefixlen}", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def exec_prefix(self, side: Side) -> list[str]:
        """The command prefix that runs a program inside one side's namespace."""
        return ["ip", "netns", "exec", self.namespaces[side]]

    def set_rate(self, shape: TbfShape | None) -> None:
        """Shape both ends' egress with tbf (replacing any earlier shape), or remove the shaping (None)."""
        for side in ("server", "client"):
            ns, dev = self.namespaces[side], self.devices[side]
            command = ["ip", "netns", "exec", ns, "tc", "qdisc"]
            if shape is None:
                args = [*command, "del", "dev", dev, "root"]
            else:
                args = [*command, "replace", "dev", dev, "root", *shape.tc_args()]
            result = subprocess.run(args, capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
            # Deleting an absent root qdisc fails harmlessly ("Cannot delete qdisc with handle of zero").
            if result.returncode != 0 and shape is not None:
                raise BenchError(f"{' '.join(args)}: {result.stderr.strip()}")
        self.shape = shape

    def close(self) -> None:
        """Delete both namespaces (and so the veth pair). Kill what runs inside them first."""
        for ns in reversed(self._created):
            try:
                _ip("netns", "delete", ns)
            except (BenchError, OSError, subprocess.TimeoutExpired):
                pass
        self._created.clear()

    def __enter__(self) -> EdgeLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def namespaces_named(names: Sequence[str]) -> list[str]:
    """Which of `names` exist as network namespaces right now (for tests that check the cleanup)."""
    listing = json.loads(_ip("-j", "netns", "list") or "[]")
    present = {entry.get("name") for entry in listing}
    return [name for name in names if name in present]
