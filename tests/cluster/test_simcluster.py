"""The simulated cluster itself: every node answers over ssh, pdsh, srun and mpirun."""
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.distributed]


def test_each_node_is_reached_at_its_own_address(cluster):
    for node in cluster.nodes:
        result = cluster.on_node(node, "echo $SSH_CONNECTION")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[2] == f"127.0.0.{cluster.nodes.index(node) + 2}"


def test_pdsh_srun_and_mpirun_start_tasks_on_every_node(cluster):
    pdsh = cluster.run(["pdsh", "-R", "ssh", "-w", ",".join(cluster.nodes), "echo $SSH_CONNECTION"], timeout=60)
    assert pdsh.returncode == 0, pdsh.stdout
    assert sorted(line.split(":")[0] for line in pdsh.stdout.splitlines()) == list(cluster.nodes)

    srun = cluster.run(["srun", "-N3", "--ntasks-per-node=2", "bash", "-c",
                        "echo $SLURMD_NODENAME $SLURM_PROCID"], timeout=60)
    assert srun.returncode == 0, srun.stdout
    placed = sorted(tuple(line.split()) for line in srun.stdout.splitlines())
    assert placed == sorted((f"node{r // 2 + 1}", str(r)) for r in range(6))

    mpirun = cluster.run(["mpirun", "--allow-run-as-root", "-H", "node2:1,node3:1", "bash", "-c",
                          "echo $OMPI_COMM_WORLD_RANK ${SSH_CONNECTION##* }"], timeout=60)
    assert mpirun.returncode == 0, mpirun.stdout
    assert sorted(mpirun.stdout.split()) == sorted(["0", "1", "2222", "2222"])
