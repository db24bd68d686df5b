"""The network a multi-node job talks over: which interface gloo/NCCL use, whether the master address can work,
whether the master port is free.

gloo binds the address its host name resolves to unless ``GLOO_SOCKET_IFNAME`` says otherwise, and on many
machines (Debian's default ``127.0.1.1 <hostname>`` line) that is loopback: the other node then fails with
"Connection refused, remote=[127.0.0.1]" and the master hangs in ``init_process_group`` without a word. So every
rank chooses the interface itself, from the route to the master address (the interface that carries the source
address the kernel picks to reach it), unless the user set ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` - on a
real cluster with InfiniBand set ``NCCL_SOCKET_IFNAME`` (and ``NCCL_IB_HCA``) as the site documents. The choice is
per host (interface names differ between hosts), made without external commands (``SIOCGIFADDR`` per interface).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path
from typing import Optional

INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915


class NetworkError(ValueError):
    """A master address or port that cannot work for this launch; the message says how to fix it."""


def resolve_ipv4(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as err:
        raise NetworkError(f"master address {host!r} does not resolve: {err}") from None


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def _interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that has one (``SIOCGIFADDR``; Linux)."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):  # no IPv4 address on this interface
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
                found[name] = socket.inet_ntoa(packed[20:24])
    return found


def route_interface(master_ip: str) -> tuple[Optional[str], Optional[str]]:
    """(interface, source address) this host uses to reach ``master_ip`` (the master's own host included)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((master_ip, 9))  # UDP: no packet is sent; the kernel only picks the route
        except OSError:
            return None, None
        source = probe.getsockname()[0]
    for name, address in _interface_addresses().items():
        if address == source:
            return name, source
    return None, source


def choose_socket_interface(master_addr: str, env=os.environ) -> Optional[str]:
    """Set ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` in ``env`` to the interface towards the master (unless the
    user set either, or the master is this host's loopback: a one-host run). Returns a line saying what was used."""
    chosen = {var: env[var] for var in INTERFACE_VARS if env.get(var)}
    if chosen:
        return "network: " + ", ".join(f"{k}={v}" for k, v in chosen.items()) + " (set by the user)"
    master_ip = resolve_ipv4(master_addr)
    if is_loopback(master_ip):
        return None
    name, source = route_interface(master_ip)
    if name is None:
        return f"network: no interface found for the route to master {master_ip}; gloo/NCCL choose their own"
    for var in INTERFACE_VARS:
        env[var] = name
    return f"network: gloo/NCCL on interface {name} ({source}, the route to master {master_addr} = {master_ip})"


def check_master_address(master_addr: str, num_nodes: int) -> str:
    """The master's IPv4 address; on a multi-node run a loopback one is an error (other nodes cannot reach it)."""
    master_ip = resolve_ipv4(master_addr)
    if num_nodes > 1 and is_loopback(master_ip):
        raise NetworkError(
            f"--master-addr {master_addr} resolves to {master_ip}, a loopback address: the other {num_nodes - 1} "
            f"node(s) cannot reach it. Pass node 0's address on the cluster network (e.g. the first address of "
            f"`hostname -I` there), or fix /etc/hosts (Debian maps the host name to 127.0.1.1)")
    return master_ip


def is_local_address(ip: str) -> bool:
    return is_loopback(ip) or ip in _interface_addresses().values()


def port_holder(port: int) -> Optional[str]:
    """'pid N (command)' of a process listening on TCP ``port`` here, when /proc shows it (else None)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in {f"socket:[{i}]" for i in inodes}:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {proc.name} ({command[:120]})"
    return None


def check_port_free(master_ip: str, port: int) -> None:
    """On the master's host: ``port`` must be free for the rendezvous store (else rank 0 dies with EADDRINUSE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("" if is_loopback(master_ip) else master_ip, port))
        except OSError:
            holder = port_holder(port)
            raise NetworkError(f"master port {port} on {master_ip} is already in use"
                               f"{' by ' + holder if holder else ''}: pass another --master-port") from None
