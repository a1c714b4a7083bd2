"""deepy.py: validate the merged config once, then start the ranks.

    python deepy.py train.py a.yml b.yml [-d CONF_DIR] [-H hostfile]

With GPUs (or a hostfile) this hands DeepSpeed's runner (pdsh, mvapich) the same options
GPT-NeoX's deepy passes (only non-default ones) and the encoded config; ``launcher:
slurm`` and ``launcher: openmpi`` start the ranks with srun/mpirun directly
(megatron.multinode). Without CUDA or a cluster it runs one rank in this process, or N
ranks through torchrun (DeepSpeed's CPU launcher counts NUMA nodes, not cores, so it
would start a single rank).
"""
import contextlib
import functools
import logging
import os
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import time

from megatron.config.launch_args import NEOX_CONFIG_FLAG, config_parser, load_from_namespace
from megatron.errors import ConfigError
from megatron.multinode import (
    deepspeed_exports,
    describe,
    forwarded_names,
    mpirun_command,
    slurm_allocation_hosts,
    srun_command,
)
from megatron.parallel.distributed import DEFAULT_MASTER_PORT, free_port
from megatron.processes import die_with_parent, is_rank

log = logging.getLogger(__name__)
MULTI_NODE_LAUNCHERS = ("slurm", "openmpi", "mvapich")
OWN_LAUNCHERS = ("slurm", "openmpi")  # started here (megatron.multinode), not by DeepSpeed
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DLTS_HOSTFILE = "/job/hostfile"  # DeepSpeed's runner reads it when no hostfile is given
LAUNCH_ID = "NEOX_LAUNCH_ID"  # set by deepy for every rank, so that a stop reaches this job's ranks only


def count_ranks(args, local_devices: int) -> int:
    """World size: the hostfile's slots after include/exclude/num_nodes/num_gpus, else
    the local device count (num_gpus when set)."""
    return sum(len(slots) for slots in active_hosts(args, local_devices).values())


def active_hosts(args, local_devices: int) -> dict:
    """Host -> slot list of the ranks to start: the hostfile (or, for launcher: slurm
    without one, the enclosing allocation) after include/exclude/num_nodes/num_gpus."""
    from deepspeed.launcher import runner

    hostfile = args.hostfile or (DLTS_HOSTFILE if os.path.isfile(DLTS_HOSTFILE) else None)
    allocation = slurm_allocation_hosts() if args.launcher == "slurm" and hostfile is None else {}
    if allocation:
        pool = {host: args.num_gpus or local_devices or tasks for host, tasks in allocation.items()}
    elif hostfile is None:
        pool = {"localhost": args.num_gpus or local_devices}
    else:
        if not os.path.isfile(hostfile):
            raise ConfigError(f"hostfile {hostfile} does not exist; fix the 'hostfile' key "
                              f"or -H")
        try:
            pool = runner.fetch_hostfile(hostfile)
        except ValueError as e:
            raise ConfigError(f"hostfile {hostfile}: {e}; lines must read "
                              f"'hostname slots=N'") from None
    try:
        active = runner.parse_inclusion_exclusion(pool, args.include or "", args.exclude or "")
    except ValueError as e:
        raise ConfigError(f"include/exclude ({args.include!r}/{args.exclude!r}): {e}") from None
    if not (args.include or args.exclude):
        active = runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus or -1)
    return active


def build_launch_command(args, script: str, extra_argv=()) -> list[str]:
    """Arguments for ``deepspeed.launcher.runner.main`` (pdsh, mvapich): runner options,
    then the script, its own arguments and ``--neox_config``."""
    cmd = []
    if args.hostfile is not None:
        cmd += ["--hostfile", args.hostfile]
    if args.include:
        cmd += ["--include", args.include]
    if args.exclude:
        cmd += ["--exclude", args.exclude]
    if args.num_nodes > 0:
        cmd += ["--num_nodes", str(args.num_nodes)]
    # DeepSpeed refuses num_gpus together with include/exclude (NeoX drops it too).
    if args.num_gpus is not None and not (args.include or args.exclude):
        cmd += ["--num_gpus", str(args.num_gpus)]
    if args.master_port != DEFAULT_MASTER_PORT:
        cmd += ["--master_port", str(args.master_port)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    if args.launcher != "pdsh":
        cmd += ["--launcher", args.launcher]
    if args.force_multi or args.launcher in MULTI_NODE_LAUNCHERS:
        cmd += ["--force_multi"]
    if args.no_ssh_check:
        cmd += ["--no_ssh_check"]
    return cmd + [script, *extra_argv, NEOX_CONFIG_FLAG, args.launch_argument()]


def run_in_process(script: str, argv: list[str]) -> int:
    """One CPU rank in this process: the launcher environment a rank expects, then the script."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      DS_ACCELERATOR="cpu")
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does
    runpy.run_path(script, run_name="__main__")
    return 0


def rank_processes() -> list:
    """This launcher's rank processes among its descendants (torchrun's or DeepSpeed's
    workers, not their own children)."""
    import psutil

    return [proc for proc in psutil.Process().children(recursive=True) if is_rank(proc)]


class SignalForwarder:
    """SIGTERM/SIGINT to the launcher -> a save request to the ranks; a second one kills them.

    The ranks' PreemptionHandler saves one checkpoint together and exits (one rank's
    request is enough: they agree at every step), and the launcher keeps waiting for them.
    Ranks on this machine (torchrun's) are signalled directly, not through torchrun or
    DeepSpeed's launch.py: both SIGKILL their workers 30 s after passing a signal on, too
    soon for a large checkpoint. A launcher with no rank of its own here (srun, mpirun)
    gets ``forward``: SIGUSR1 reaches every rank through both, while on SIGTERM they kill
    the ranks after a short grace. Ranks on ``remote_hosts`` (pdsh) are reached over pdsh
    by tools/signal_ranks.py: pdsh and its ssh sessions, which carry the ranks' output,
    are left alone.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, forward: signal.Signals = signal.SIGTERM, remote_hosts=()):
        self.forward, self.remote_hosts = forward, list(remote_hosts)
        self.received = 0
        self._remote_requests = []

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for request in self._remote_requests:
            request.wait()

    def _handle(self, signum, frame):
        import psutil

        self.received += 1
        name = signal.Signals(signum).name
        if self.received > 1:
            print(f"deepy: second {name}: killing the ranks without saving", file=sys.stderr, flush=True)
            self._signal_remote_ranks(signal.SIGKILL)
            targets, forward = psutil.Process().children(recursive=True), signal.SIGKILL
        else:
            targets = rank_processes() or ([] if self.remote_hosts else psutil.Process().children())
            where = f" on {len(self.remote_hosts)} node(s)" if self.remote_hosts else ""
            print(f"deepy: {name}: asking the ranks{where} to save a checkpoint and exit ({len(targets)} "
                  f"signalled here; send it again to stop them at once)", file=sys.stderr, flush=True)
            self._signal_remote_ranks(signal.SIGUSR1)
            forward = self.forward
        for proc in targets:
            try:
                proc.send_signal(forward)
            except psutil.Error:
                pass

    def _signal_remote_ranks(self, sig: signal.Signals) -> None:
        if not self.remote_hosts:
            return
        tool = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(REPO_ROOT, 'tools', 'signal_ranks.py'))}"
        cmd = ["pdsh", "-R", "ssh", "-w", ",".join(self.remote_hosts),
               f"{tool} --signal {sig.name} --launch {shlex.quote(os.environ[LAUNCH_ID])}"]
        self._remote_requests.append(subprocess.Popen(cmd, stdout=sys.stderr, start_new_session=True))


@contextlib.contextmanager
def _our_signal_handlers_kept(module):
    """Run DeepSpeed's pdsh runner (``module``) without letting it replace our SIGTERM and
    SIGINT handlers: its own kills pdsh at once, which cuts the ssh sessions carrying the
    ranks' output (a rank that prints before it saves dies), and exits 1 a second later
    without waiting for the ranks."""
    real = module.signal

    class KeepOurs:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def signal(signum, handler):
            if signum in SignalForwarder.SIGNALS:
                return real.getsignal(signum)
            return real.signal(signum, handler)

    module.signal = KeepOurs()
    try:
        yield
    finally:
        module.signal = real


def wait_for_ranks(cmd: list[str], env: dict | None = None, forward: signal.Signals = signal.SIGTERM) -> int:
    """Run ``cmd`` (torchrun, srun or mpirun: it starts the ranks) to its end and return
    its status, which is the ranks' (a death by signal N as a shell shows it: 128+N).

    SIGTERM/SIGINT to us reach the ranks meanwhile (SignalForwarder). ``cmd`` gets its own
    session, so a terminal's Ctrl-C reaches only us and we pass it on; and SIGTERM when we
    die, even by SIGKILL, so it stops its ranks instead of leaving them as orphans.
    """
    with SignalForwarder(forward):
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                preexec_fn=functools.partial(die_with_parent, signal.SIGTERM))
        status = proc.wait()
    return status if status >= 0 else 128 - status


def run_torchrun(script: str, argv: list[str], nproc: int) -> int:
    """N CPU ranks on this machine, one thread each (the measured fast setting)."""
    # The ranks import megatron from this checkout even when the script lives elsewhere.
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "megatron.torchrun", "--standalone",
           f"--nproc_per_node={nproc}", script, *argv]
    return wait_for_ranks(cmd, env)


def run_own_launcher(args, script: str, hosts: dict[str, int], forwarded: list[str]) -> int:
    """launcher: slurm or openmpi: srun/mpirun starts every rank (megatron.multinode)."""
    rank_argv = [NEOX_CONFIG_FLAG, args.launch_argument()]
    if args.launcher == "slurm":
        cmd = srun_command(args, hosts, script, rank_argv)
    else:
        cmd = mpirun_command(args, hosts, script, rank_argv, forwarded)
    log.info("starting %d rank(s) on %s: %s", sum(hosts.values()), ", ".join(hosts), describe(cmd))
    if forwarded:
        log.info("forwarding to every rank: %s", " ".join(forwarded))
    return wait_for_ranks(cmd, forward=signal.SIGUSR1)


# What a launcher gives each rank. Inherited from an enclosing job (or a process that
# once ran a rank itself) they would make the launcher and torchrun look like ranks.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def _forget_rank_environment() -> None:
    for key in RANK_VARIABLES:
        os.environ.pop(key, None)


def main(argv=None) -> int:
    import torch

    ns = config_parser("deepy.py", with_script=True).parse_args(argv)
    if not os.path.isfile(ns.script):
        raise ConfigError(f"script {ns.script} does not exist; pass e.g. train.py")
    args = load_from_namespace(ns)
    on_gpus = torch.cuda.is_available() or args.hostfile is not None
    own_launcher = args.launcher in OWN_LAUNCHERS and (on_gpus or slurm_allocation_hosts())
    local_devices = torch.cuda.device_count() if on_gpus else (0 if own_launcher else 1)
    hosts = active_hosts(args, local_devices)
    args.configure_world(sum(len(slots) for slots in hosts.values()))
    from megatron.parallel.extension_locks import check_extension_locks

    check_extension_locks(single_node=args.hostfile is None and not own_launcher)
    if args.hostfile is None and os.path.basename(ns.script) == "train.py":  # ranks share our paths
        from megatron.training.preflight import check_before_launch

        check_before_launch(args)
    log.info("launching %s on %d rank(s)", ns.script, args.world_size)
    _forget_rank_environment()
    if (args.comment or args.account) and args.launcher != "slurm":
        raise ConfigError("comment/account are srun options; set launcher: slurm or remove them")
    forwarded = forwarded_names(args.launcher_env)
    if own_launcher:
        return run_own_launcher(args, ns.script, {h: len(s) for h, s in hosts.items()}, forwarded)
    if on_gpus:
        from deepspeed.launcher import runner

        multi_node = args.hostfile is not None and (len(hosts) > 1 or args.force_multi)
        remote = list(hosts) if multi_node and args.launcher == "pdsh" else []  # the ranks are pdsh's
        os.environ[LAUNCH_ID] = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        forwarded = [*forwarded, LAUNCH_ID]
        with SignalForwarder(remote_hosts=remote), _our_signal_handlers_kept(runner), deepspeed_exports(forwarded):
            return runner.main(build_launch_command(args, ns.script)) or 0
    rank_argv = [NEOX_CONFIG_FLAG, args.launch_argument()]
    if args.world_size == 1:
        return run_in_process(ns.script, rank_argv)
    return run_torchrun(ns.script, rank_argv, args.world_size)
