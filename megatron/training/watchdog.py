"""A rank that stops answering ends the whole job within a bound, named in one line.

A rank frozen by SIGSTOP or on a hung node keeps its connections open, so its peers would
wait in their next collective for the whole collective timeout (``distributed_timeout_
minutes``). Here every rank's background thread bumps a counter in the rendezvous store
and reads everyone's: a counter that has not moved for ``peer_heartbeat_timeout_seconds``
by this rank's clock (the nodes' clocks need not agree) means that rank has stopped
answering. Each peer then prints one line naming the rank and its node, kills it if it
runs on the same machine, and exits 1, so its launcher ends the job. The thread runs whatever the main thread is doing (a long
save, building index maps), so only a frozen or vanished process goes quiet. A rank whose
run has ended says so and is not waited for. Store errors are not counted (the store's
host is gone: the collectives end the job then).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

BEATS_PER_TIMEOUT = 6
DONE = "done"
STOP_WAIT_S = 10


def silent_peer_line(peer: int, host: str, quiet_s: float, timeout_s: float, rank: int) -> str:
    return (f"error: rank {peer} on {host} has not answered for {quiet_s:.0f} s (stopped, hung or gone; "
            f"peer_heartbeat_timeout_seconds: {timeout_s:g}); rank {rank} exits so that the job ends")


class PeerWatchdog:
    """This rank's heartbeat and its watch over every other rank's (module docstring)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=timedelta(seconds=timeout_s))
        self._store = dist.PrefixStore("neox_peer_watchdog", client)
        self._store.set(f"process/{rank}", f"{socket.gethostname()} {os.getpid()}")
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peer-watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, args) -> PeerWatchdog | None:
        """One per rank of a multi-rank run; None when off (``peer_heartbeat_timeout_seconds: 0``)."""
        timeout_s = args.peer_heartbeat_timeout_seconds
        if not timeout_s or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size(), timeout_s)

    def stop(self) -> None:
        """This rank's run has ended (any way): its peers stop waiting for its beat."""
        self._stopped.set()
        # bounded: a store whose host froze would hold the thread for the store timeout
        self._thread.join(timeout=STOP_WAIT_S)

    def _watch(self) -> None:
        beats, seen, since = 0, {}, {}
        peers = [r for r in range(self.world_size) if r != self.rank]
        started = time.monotonic()
        while not self._stopped.wait(self.timeout_s / BEATS_PER_TIMEOUT):
            beats += 1
            try:
                self._store.set(f"beat/{self.rank}", str(beats))
                now = time.monotonic()
                for peer in peers:
                    key = f"beat/{peer}"
                    value = self._store.get(key) if self._store.check([key]) else None
                    if value != seen.get(peer) or value == DONE.encode():
                        seen[peer], since[peer] = value, now
                    elif now - since.get(peer, started) > self.timeout_s:
                        self._end_job(peer, now - since.get(peer, started))
            except Exception:  # see the module docstring
                continue
        try:
            self._store.set(f"beat/{self.rank}", DONE)
        except Exception:  # the store's host already left; nobody is waiting then
            pass

    def _end_job(self, peer: int, quiet_s: float) -> None:
        try:
            key = f"process/{peer}"
            host, pid = self._store.get(key).decode().split() if self._store.check([key]) else ("an unknown node", "0")
            print(silent_peer_line(peer, host, quiet_s, self.timeout_s, self.rank), file=sys.stderr, flush=True)
            if host == socket.gethostname():
                # A stopped process ignores the SIGTERM its launcher would send first (torchrun
                # then waits 30 s before SIGKILL); on this machine, end it now.
                os.kill(int(pid), signal.SIGKILL)
        finally:
            os._exit(1)  # the main thread is blocked in a collective with that rank
