"""Several test hosts on one machine: network namespaces on a bridge (needs root, iproute2).

Each host is a namespace with one veth (`eth0`) plugged into a bridge in the root namespace.
Addresses come from a private /24 of the run's (`RunNames.subnet`); nothing leaves the machine.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from tests.support.run import RunNames


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class NamespaceHost:
    name: str       # namespace name
    address: str    # its eth0 address


class NamespaceNetwork:
    """A bridge with `count` namespace hosts: bridge .1, hosts .11, .12, ..."""

    def __init__(self, count: int, run: RunNames, network: int = 0) -> None:
        # Names and subnet carry the run's tag: two runs on one machine never share them, and
        # a run that died leaves nothing the next one trips on (tests.support.run sweeps it).
        self.bridge = run.bridge(network)
        self.subnet = run.subnet(network)
        self.gateway = f"{self.subnet}.1"
        self.hosts = [NamespaceHost(run.namespace(network, i), f"{self.subnet}.{10 + i}")
                      for i in range(1, count + 1)]
        self._veths: list[str] = []

    def create(self) -> NamespaceNetwork:
        self.destroy()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up", "multicast", "on")
        for index, host in enumerate(self.hosts, 1):
            outer = f"{self.bridge}v{index}"
            ip("netns", "add", host.name)
            ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            ip("link", "set", outer, "master", self.bridge, "up")
            run_in = ("netns", "exec", host.name, "ip")
            ip(*run_in, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip(*run_in, "link", "set", "eth0", "up", "multicast", "on")
            ip(*run_in, "link", "set", "lo", "up")
            ip(*run_in, "route", "add", "224.0.0.0/4", "dev", "eth0")
            self._veths.append(outer)
        return self

    def destroy(self) -> None:
        for host in self.hosts:
            pids = ip("netns", "pids", host.name, check=False).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-KILL", pid], capture_output=True)
            ip("netns", "del", host.name, check=False)
        ip("link", "del", self.bridge, check=False)

    def cut(self, host: NamespaceHost) -> None:
        """Pull the cable: the host's veth goes down."""
        ip("-n", host.name, "link", "set", "eth0", "down")

    def reconnect(self, host: NamespaceHost) -> None:
        ip("-n", host.name, "link", "set", "eth0", "up")
