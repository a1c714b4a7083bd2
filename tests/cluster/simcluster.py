"""A simulated 3-node cluster on this machine, for the multi-node launch tests.

    python tests/cluster/simcluster.py up      # as root on Debian; idempotent
    python tests/cluster/simcluster.py status
    python tests/cluster/simcluster.py down    # stops everything by PID, undoes every edit

Nodes node1..node3 live on 127.0.0.2-4. Each gets its own sshd (root login with a
throw-away key only) and its own slurmd; one munged and one slurmctld serve them all, and
OpenMPI and pdsh reach the nodes through ssh. Everything the cluster writes lives under
STATE_DIR, except two marked blocks that ``down`` removes again: the node names in
/etc/hosts and an ``Include`` of the cluster's ssh config at the top of ~/.ssh/config.
Clients find slurm through ``SLURM_CONF`` (``slurm_environment()``).

Missing packages are installed with apt-get (CI's fresh machine); every node has the
machine's cores, so the tests run 1-2 ranks per node with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE_DIR = Path(os.environ.get("NEOX_SIMCLUSTER_DIR", "/tmp/neox-simcluster"))
NODES = ("node1", "node2", "node3")
SSH_PORT = 2222  # on each node's own address; port 22 may belong to the machine's sshd
SLURMCTLD_PORT = 16817
FIRST_SLURMD_PORT = 16818
PACKAGES = {  # binary -> Debian package
    "sshd": "openssh-server", "ssh": "openssh-client", "pdsh": "pdsh",
    "slurmctld": "slurmctld", "slurmd": "slurmd", "srun": "slurm-client",
    "munged": "munge", "mpirun": "openmpi-bin",
}
MARK_BEGIN = "# >>> neox-simcluster (removed by tests/cluster/simcluster.py down) >>>"
MARK_END = "# <<< neox-simcluster <<<"
HOSTS_FILE = Path("/etc/hosts")
USER_SSH_CONFIG = Path.home() / ".ssh" / "config"


class ClusterUnavailable(RuntimeError):
    """The cluster cannot start here (not root, not Linux, a daemon refused)."""


def node_address(node: str) -> str:
    return f"127.0.0.{NODES.index(node) + 2}"


def slurm_environment() -> dict:
    """What a slurm client (srun, sbatch, scontrol) needs to find this cluster."""
    return {"SLURM_CONF": str(STATE_DIR / "slurm.conf")}


# ---------------------------------------------------------------- packages

def install_missing_packages() -> None:
    missing = sorted({pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None
                      and not Path("/usr/sbin", binary).exists()})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = dict(stdout=subprocess.DEVNULL, env=env, check=True)
    subprocess.run(["apt-get", "update", "-qq"], **quiet)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], **quiet)


# ---------------------------------------------------------------- marked blocks

def _without_block(text: str) -> str:
    lines, keep, inside = text.splitlines(keepends=True), [], False
    for line in lines:
        if line.rstrip("\n") == MARK_BEGIN:
            inside = True
        elif line.rstrip("\n") == MARK_END and inside:
            inside = False
        elif not inside:
            keep.append(line)
    return "".join(keep)


def _set_block(path: Path, body: str, at_top: bool) -> None:
    old = path.read_text() if path.exists() else ""
    rest = _without_block(old)
    block = f"{MARK_BEGIN}\n{body.rstrip()}\n{MARK_END}\n"
    path.write_text(block + rest if at_top else rest + ("" if rest.endswith("\n") or not rest else "\n") + block)


def _remove_block(path: Path) -> None:
    """Remove our block; a file that held nothing else goes too (we created it)."""
    if path.exists():
        old = path.read_text()
        new = _without_block(old)
        if not new.strip() and new != old:
            path.unlink()
        elif new != old:
            path.write_text(new)


# ---------------------------------------------------------------- processes

_STARTED: dict[int, subprocess.Popen] = {}  # daemons this process started, by PID


def _pid_file(name: str) -> Path:
    return STATE_DIR / "pids" / f"{name}.pid"


def _read_pid(name: str) -> int | None:
    try:
        pid = int(_pid_file(name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    child = _STARTED.get(pid)
    if child is not None:
        return child.poll() is None  # reaps it: a zombie of ours is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise ClusterUnavailable(f"{what} did not come up within {timeout:.0f} s; see {STATE_DIR}/logs")


def _start_daemon(name: str, cmd: list[str]) -> None:
    """Start ``cmd`` (in the foreground mode of the daemon) unless ``name`` runs already."""
    if _read_pid(name) is not None:
        return
    log = open(STATE_DIR / "logs" / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    _STARTED[proc.pid] = proc
    _pid_file(name).write_text(f"{proc.pid}\n")  # foreground: the daemon keeps this PID
    _wait_for(lambda: _read_pid(name) is not None or proc.poll() is not None, name)
    if proc.poll() is not None:
        raise ClusterUnavailable(f"{name} exited with {proc.returncode}; see {STATE_DIR}/logs/{name}.out")


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- configuration

def _write_ssh() -> None:
    key = STATE_DIR / "ssh" / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(STATE_DIR / "ssh" / "host_key")], check=True)
    (STATE_DIR / "ssh" / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    client = [f"Host {' '.join(NODES)}",
              f"    Port {SSH_PORT}", f"    IdentityFile {key}", "    IdentitiesOnly yes",
              "    User root", "    StrictHostKeyChecking no", "    UserKnownHostsFile /dev/null",
              "    LogLevel ERROR", "    BatchMode yes"]
    (STATE_DIR / "ssh" / "client_config").write_text("\n".join(client) + "\n")
    for node in NODES:
        (STATE_DIR / "ssh" / f"sshd_{node}.conf").write_text("\n".join([
            f"ListenAddress {node_address(node)}:{SSH_PORT}",
            f"HostKey {STATE_DIR}/ssh/host_key",
            f"AuthorizedKeysFile {STATE_DIR}/ssh/authorized_keys",
            f"PidFile {_pid_file('sshd_' + node)}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "AcceptEnv *", "PermitUserEnvironment no", "MaxStartups 100", "MaxSessions 100",
            "Subsystem sftp internal-sftp",
        ]) + "\n")


def _write_slurm_conf() -> None:
    host = socket.gethostname()
    cpus = os.cpu_count() or 2
    lines = [
        "ClusterName=neoxsim",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={SLURMCTLD_PORT}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={STATE_DIR}/munge/munge.socket",
        f"StateSaveLocation={STATE_DIR}/slurm/ctld",
        f"SlurmdSpoolDir={STATE_DIR}/slurm/%n",
        f"SlurmctldPidFile={_pid_file('slurmctld')}",
        f"SlurmdPidFile={STATE_DIR}/pids/slurmd_%n.pid",
        f"SlurmctldLogFile={STATE_DIR}/logs/slurmctld.log",
        f"SlurmdLogFile={STATE_DIR}/logs/slurmd_%n.log",
        "ProctrackType=proctrack/pgid", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill", "MpiDefault=none", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SlurmdParameters=config_overrides", "KillWait=30", "InactiveLimit=0",
        "SlurmctldTimeout=30", "SlurmdTimeout=60", "MessageTimeout=30",
        "SlurmctldDebug=info", "SlurmdDebug=info",
    ]
    for i, node in enumerate(NODES):
        lines.append(f"NodeName={node} NodeAddr={node_address(node)} NodeHostname={host} "
                     f"Port={FIRST_SLURMD_PORT + i} CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=sim Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE "
                 "State=UP OverSubscribe=FORCE:4")
    (STATE_DIR / "slurm.conf").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- up / down

def _nodes_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                         env=dict(os.environ, **slurm_environment()))
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    return all(states.get(n, "").rstrip("*") in ("idle", "mix", "alloc") for n in NODES)


def up() -> None:
    """Bring the cluster up; what already runs is kept."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        raise ClusterUnavailable("the simulated cluster needs root on Linux")
    install_missing_packages()
    for sub in ("pids", "logs", "ssh", "munge", "slurm/ctld", *(f"slurm/{n}" for n in NODES)):
        (STATE_DIR / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(STATE_DIR / "munge", 0o700)
    _set_block(HOSTS_FILE, "\n".join(f"{node_address(n)} {n}" for n in NODES), at_top=False)
    _write_ssh()
    if not USER_SSH_CONFIG.parent.exists():
        USER_SSH_CONFIG.parent.mkdir(mode=0o700)
        (STATE_DIR / "created_ssh_dir").touch()
    _set_block(USER_SSH_CONFIG, f"Include {STATE_DIR}/ssh/client_config", at_top=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    for node in NODES:
        _start_daemon(f"sshd_{node}", [sshd, "-D", "-e", "-f", str(STATE_DIR / "ssh" / f"sshd_{node}.conf")])
        _wait_for(lambda n=node: _port_open(node_address(n), SSH_PORT), f"sshd on {node}")

    key = STATE_DIR / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    _start_daemon("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                             f"--socket={STATE_DIR}/munge/munge.socket",
                             f"--pid-file={STATE_DIR}/munge/munged.pid",
                             f"--seed-file={STATE_DIR}/munge/munged.seed",
                             f"--log-file={STATE_DIR}/logs/munged.log"])
    _wait_for(lambda: Path(STATE_DIR / "munge" / "munge.socket").exists(), "munged")

    _write_slurm_conf()
    conf = str(STATE_DIR / "slurm.conf")
    _start_daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
    _wait_for(lambda: _port_open("127.0.0.1", SLURMCTLD_PORT), "slurmctld")
    for node in NODES:
        _start_daemon(f"slurmd_{node}", ["slurmd", "-D", "-N", node, "-f", conf])
    _wait_for(_nodes_idle, "the three slurmd (sinfo: idle)", timeout=60)


def _stop(name: str) -> None:
    pid = _read_pid(name)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _read_pid(name) == pid:
        time.sleep(0.2)
    if _read_pid(name) == pid:
        os.kill(pid, signal.SIGKILL)


def _cancel_jobs() -> None:
    """Cancel what still runs on the cluster (a failed test's job) before slurmd goes."""
    env = dict(os.environ, **slurm_environment())
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout.split()
    if jobs:
        subprocess.run(["scancel", *jobs], env=env, capture_output=True)
        try:
            _wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True,
                                                 env=env).stdout.strip(), "cancelling the jobs")
        except ClusterUnavailable:
            pass  # stopping slurmd below ends what is left


def down() -> None:
    """Stop every daemon by its PID and undo the edits to /etc/hosts and ~/.ssh/config."""
    if _read_pid("slurmctld") is not None:
        _cancel_jobs()
    for name in (*(f"slurmd_{n}" for n in NODES), "slurmctld", "munged", *(f"sshd_{n}" for n in NODES)):
        _stop(name)
    _remove_block(HOSTS_FILE)
    _remove_block(USER_SSH_CONFIG)
    if (STATE_DIR / "created_ssh_dir").exists() and not any(USER_SSH_CONFIG.parent.iterdir()):
        USER_SSH_CONFIG.parent.rmdir()
    if STATE_DIR.exists():
        shutil.rmtree(STATE_DIR, ignore_errors=True)


def status() -> dict:
    names = (*(f"sshd_{n}" for n in NODES), "munged", "slurmctld", *(f"slurmd_{n}" for n in NODES))
    return {name: _read_pid(name) for name in names}


def is_up() -> bool:
    return all(pid is not None for pid in status().values())


def on_node(node: str, command: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a shell command on ``node`` through ssh, as pdsh and mpirun reach it."""
    return subprocess.run(["ssh", node, command], capture_output=True, text=True, **kwargs)


def main(argv: list[str]) -> int:
    action = argv[0] if argv else "status"
    if action == "up":
        try:
            up()
        except ClusterUnavailable as e:
            print(f"simcluster: {e}", file=sys.stderr)
            return 1
        print(f"simcluster: up ({', '.join(f'{n}={node_address(n)}' for n in NODES)}); "
              f"export SLURM_CONF={STATE_DIR}/slurm.conf for srun/sbatch")
    elif action == "down":
        down()
        print("simcluster: down")
    elif action == "status":
        print(json.dumps(status(), indent=1))
        return 0 if is_up() else 1
    else:
        print("usage: simcluster.py up|down|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
