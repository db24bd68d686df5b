"""Several "hosts" on this machine: network namespaces joined by a veth pair, with addresses assigned here and used
only inside them (no route to anything else). Used by the two-host launch tests (tests/faults/test_fault_multihost.py)
and the two-node Slurm cluster (tests/test_slurm.py).

    with netns_hosts("mh", subnet=231) as hosts:     # raises NetnsRefused where the machine does not allow it
        hosts[0].run("ip", "addr")                    # a command inside host 0's namespace
        hosts[1].tx_bytes()                           # bytes sent on host 1's veth

Each host also gets a hosts file naming every host (``Host.hosts_file``; the Slurm nodes bind-mount it as their
/etc/hosts). Deleting a namespace deletes its end of the veth pair; the context removes both namespaces."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


class NetnsRefused(RuntimeError):
    """This machine does not let us build network namespaces (not root, no `ip`, no veth support)."""


@dataclass
class Host:
    name: str  # its host name in the hosts file
    netns: str
    veth: str
    address: str
    hosts_file: str = ""

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], capture_output=True, text=True, check=True,
                              **kwargs)

    def tx_bytes(self) -> int:
        return int(self.run("cat", f"/sys/class/net/{self.veth}/statistics/tx_bytes").stdout)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def netns_hosts(prefix: str, subnet: int, count: int = 2):
    """``count`` (2) hosts named ``<prefix>node<i>`` at 10.<subnet>.<pid % 250>.<i+1>/24; namespaces and veths carry
    this process's pid so that concurrent test sessions do not collide."""
    if count != 2:
        raise ValueError("a veth pair joins two hosts")
    if os.geteuid() != 0:
        raise NetnsRefused(f"network namespaces need root (uid {os.geteuid()})")
    tag = f"{prefix}{os.getpid() % 100000}"
    hosts = [Host(f"{prefix}node{i}", f"{tag}h{i}", f"{tag}v{i}", f"10.{subnet}.{os.getpid() % 250}.{i + 1}")
             for i in range(count)]
    with tempfile.TemporaryDirectory(prefix=f"{tag}-hosts-") as tmp:
        table = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in hosts)
        for h in hosts:
            h.hosts_file = str(Path(tmp) / f"hosts.{h.name}")
            Path(h.hosts_file).write_text(table)
        try:
            for h in hosts:
                _ip("netns", "add", h.netns)
            _ip("link", "add", hosts[0].veth, "type", "veth", "peer", "name", hosts[1].veth)
            for h in hosts:
                _ip("link", "set", h.veth, "netns", h.netns)
                h.run("ip", "addr", "add", f"{h.address}/24", "dev", h.veth)
                h.run("ip", "link", "set", h.veth, "up")
                h.run("ip", "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            _delete(hosts)
            raise NetnsRefused(f"cannot build network namespaces here: {getattr(err, 'stderr', '') or err}") from None
        try:
            yield hosts
        finally:
            _delete(hosts)


def _delete(hosts: list[Host]) -> None:
    for h in hosts:
        subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)
