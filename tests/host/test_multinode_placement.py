"""Multi-node placement: the policy and teacher groups land on nodes as their
--*.num_nodes / --*.num_gpus_per_node flags say, on a local multi-node Ray cluster
(ray.cluster_utils.Cluster: several raylets on one machine, logical GPUs)."""

from __future__ import annotations

import collections

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def three_node_cluster(monkeypatch):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from tsdkd_plugin.host.device import cpu_mode_env

    for name, value in cpu_mode_env(threads_per_process=1).items():
        monkeypatch.setenv(name, value)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2})
    for _ in range(2):
        cluster.add_node(num_cpus=4, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_policy_and_teacher_groups_follow_their_node_flags(three_node_cluster):
    import ray
    from openrlhf.trainer.ray.launcher import RayActorGroup

    from tsdkd_plugin.host.actor import TSDKDPolicyActor
    from tsdkd_plugin.host.teachers import TeacherModelActor

    assert ray.cluster_resources()["GPU"] == 6
    # --actor.num_nodes 2 --actor.num_gpus_per_node 2 ; --teacher.num_nodes 1 --teacher.num_gpus_per_node 1
    policy = RayActorGroup(2, 2, TSDKDPolicyActor, pg=None, num_gpus_per_actor=1)
    teacher = RayActorGroup(1, 1, TeacherModelActor, pg=None, num_gpus_per_actor=1)
    policy_places = ray.get(policy.async_run_method("placement"), timeout=300)
    teacher_places = ray.get(teacher.async_run_method("placement"), timeout=300)

    policy_nodes = collections.Counter(p["node_id"] for p in policy_places)
    teacher_nodes = {p["node_id"] for p in teacher_places}
    assert sorted(policy_nodes.values()) == [2, 2], policy_nodes  # 4 ranks: 2 nodes x 2 GPUs
    assert len(teacher_nodes) == 1 and not teacher_nodes & set(policy_nodes)  # the free node
    for place in policy_places + teacher_places:
        assert len(place["gpu_ids"]) == 1  # one logical GPU per rank
    per_node_gpus = collections.defaultdict(set)
    for place in policy_places + teacher_places:
        per_node_gpus[place["node_id"]].update(place["gpu_ids"])
    assert sorted(len(gpus) for gpus in per_node_gpus.values()) == [1, 2, 2]  # no GPU handed out twice


def test_capacity_check_counts_every_group(three_node_cluster):
    import ray

    from tsdkd_plugin.cli.train_tsdkd import parse_args
    from tsdkd_plugin.host.args import ArgumentError
    from tsdkd_plugin.host.preflight import check_cluster_capacity, required_gpus

    base = ["--actor.model_name_or_path", "s", "--teacher.model_name_or_path", "t", "--data.prompt_dataset", "d",
            "--actor.num_nodes", "2", "--actor.num_gpus_per_node", "2",
            "--teacher.num_nodes", "1", "--teacher.num_gpus_per_node", "2"]
    gpus = ray.cluster_resources()["GPU"]
    fits, _ = parse_args(base + ["--train.colocate_all", "--vllm.num_engines", "4"])
    assert required_gpus(fits)["total"] == 6
    check_cluster_capacity(fits, gpus)

    too_many, _ = parse_args(base + ["--vllm.num_engines", "2"])
    with pytest.raises(ArgumentError, match=r"needs 8 GPUs .* the Ray cluster has 6"):
        check_cluster_capacity(too_many, gpus)
