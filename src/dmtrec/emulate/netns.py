"""Emulated 2-tier network: one Linux network namespace per host, joined by shaped links.

Each emulated host h gets a namespace with loopback (its intra-host link, shaped to
``intra_mbit``) and a veth to a private bridge (its NIC, shaped to ``cross_mbit`` both ways:
tbf on the host end for egress and on the bridge end for ingress). Processes of one host share
its namespace, so traffic between them stays on its loopback; traffic to another host crosses
two shaped veths. Addresses are 10.213.0.x/24, assigned by this module inside namespaces it
created; nothing is routed anywhere else. Everything is torn down on exit, on error and on
SIGTERM/SIGINT; namespaces left by a process that was killed with SIGKILL are removed by the
next run (their names carry the creating pid).

Needs root and iproute2 (``ip``, ``tc``); ``available()`` says whether this machine has them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dmtrec.errors import ConfigError

PREFIX = "dmtrec"
SUBNET = "10.213.0"


@dataclass(frozen=True)
class LinkSpec:
    """Bandwidths of the two link classes (Mbit/s). Default ratio 48:1, as TorchRec's planner
    topology defaults (600 GB/s intra vs 12.5 GB/s inter), at a rate a 2-core box can drive."""

    cross_mbit: float = 100.0
    ratio: float = 48.0
    # Most time a packet may wait in a link's queue (tbf ``latency``), i.e. the switch buffer
    # depth: deep (100 ms) never drops; shallow buffers drop bursts from many flows (incast).
    queue_ms: float = 100.0

    @property
    def intra_mbit(self) -> float:
        return self.cross_mbit * self.ratio

    def to_dict(self) -> dict[str, float]:
        return {
            "cross_mbit": self.cross_mbit,
            "intra_mbit": self.intra_mbit,
            "ratio": self.ratio,
            "queue_ms": self.queue_ms,
        }


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str | None:
    """None if namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces of earlier runs whose creating process is gone."""
    removed = []
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)(h\d+|sw)", name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
            removed.append(name)
    return removed


class EmulatedHosts:
    """Context manager creating (and always removing) H shaped host namespaces."""

    def __init__(self, hosts: int, link: LinkSpec) -> None:
        if hosts < 2:
            raise ConfigError("--link netns needs --hosts >= 2")
        if hosts > 200:
            raise ConfigError("--link netns supports at most 200 hosts")
        self.hosts = hosts
        self.link = link
        tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{tag}sw"
        self.namespaces = [f"{tag}h{i}" for i in range(hosts)]
        self.ifnames = [f"dh{os.getpid() % 100000}x{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self._created: list[str] = []
        self._old_handlers: dict[int, object] = {}

    def _tbf(self, ns: str, dev: str, mbit: float) -> None:
        # tbf drops any packet larger than its bucket, and veth/lo hand it 64 KiB GSO
        # packets: the bucket must hold one (else TCP stalls), or 1 ms of traffic if larger.
        burst = f"{max(600, int(mbit))}kbit"
        tbf = ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit:g}mbit"]
        _ip("netns", "exec", ns, *tbf, "burst", burst, "latency", f"{self.link.queue_ms:g}ms")

    def __enter__(self) -> EmulatedHosts:
        why = available()
        if why:
            raise ConfigError(f"--link netns: {why}; use --link delay or --link none")
        remove_stale()
        self._install_signal_handlers()
        try:
            _ip("netns", "add", self.switch)
            self._created.append(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (ns, dev, addr) in enumerate(zip(self.namespaces, self.ifnames, self.addresses)):
                _ip("netns", "add", ns)
                self._created.append(ns)
                peer = f"ds{os.getpid() % 100000}x{i}"
                _ip(
                    "link",
                    "add",
                    dev,
                    "netns",
                    ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer,
                    "netns",
                    self.switch,
                )
                _ip("-n", self.switch, "link", "set", peer, "master", "br0")
                _ip("-n", self.switch, "link", "set", peer, "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self._write_hosts_file(ns)
                self._tbf(ns, dev, self.link.cross_mbit)  # host -> network
                self._tbf(self.switch, peer, self.link.cross_mbit)  # network -> host
                self._tbf(ns, "lo", self.link.intra_mbit)  # inside the host
        except subprocess.CalledProcessError as e:
            self.close()
            raise ConfigError(
                f"--link netns: setting up namespaces failed: {e.stderr.strip() or e}"
            ) from None
        except BaseException:
            self.close()
            raise
        return self

    def _write_hosts_file(self, ns: str) -> None:
        """Names for the namespace addresses, so c10d's reverse lookup of a peer socket
        succeeds (else every connection logs "hostname of the client socket cannot be
        retrieved"). ``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts`` over
        ``/etc/hosts`` for the processes it starts; removed with the namespace."""
        d = Path("/etc/netns") / ns
        d.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"]
        lines += [f"{a} {n}" for a, n in zip(self.addresses, self.namespaces)]
        # TCPStore's dual-stack listener sees IPv4 peers as v4-mapped IPv6 addresses, which
        # glibc does not map back to the IPv4 lines above
        lines += [f"::ffff:{a} {n}" for a, n in zip(self.addresses, self.namespaces)]
        (d / "hosts").write_text("\n".join(lines) + "\n")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every namespace this object created (their veths and bridge go with them)."""
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._created.clear()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: object) -> None:
            self.close()
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: rely on __exit__
                pass

    def exists(self) -> bool:
        names = _ip("netns", "list", check=False).stdout
        return any(ns in names for ns in [self.switch, *self.namespaces])
