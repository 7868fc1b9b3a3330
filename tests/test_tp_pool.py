"""Tensor-parallel engine groups pool their prompts (r1v3.rl.tp_pool): over real gloo process
groups, every member of a group makes the same engine call (all members' prompts in rank order,
each prompt with its own member's sampling parameters) and gets back the outputs of its own
prompts."""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from r1v3.errors import UserError
from r1v3.rl.tp_pool import tp_groups


def test_groups_are_consecutive_ranks():
    assert tp_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tp_groups(2, 1) == [[0], [1]]
    with pytest.raises(UserError, match="must divide the number of processes"):
        tp_groups(6, 4)


def member(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from r1v3.rl.tp_pool import new_tp_group, pooled

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = new_tp_group(2)
    prompts = [f"r{rank}-p{i}" for i in range(3 if rank % 2 == 0 else 2)]  # uneven shares
    calls = []

    def engine(batch, params):
        calls.append({"batch": batch, "params": params})
        return [f"{p}:{each['seed']}" for p, each in zip(batch, params)]

    outputs = pooled(group, prompts, {"seed": 100 + rank}, engine)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"prompts": prompts, "outputs": outputs, "calls": calls}, f)
    dist.destroy_process_group()


def test_members_share_one_call_and_keep_their_outputs(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(member, args=(4, port, str(tmp_path)), nprocs=4, start_method="spawn", join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    for first, second in ((0, 1), (2, 3)):  # the two groups
        a, b = ranks[first], ranks[second]
        assert a["calls"] == b["calls"] and len(a["calls"]) == 1, "one identical engine call per group"
        assert a["calls"][0]["batch"] == a["prompts"] + b["prompts"]
        assert a["calls"][0]["params"] == ([{"seed": 100 + first}] * len(a["prompts"])
                                           + [{"seed": 100 + second}] * len(b["prompts"])), "each prompt's own"
        for rank, r in ((first, a), (second, b)):
            assert r["outputs"] == [f"{p}:{100 + rank}" for p in r["prompts"]]
