"""GateLosses with a process group: 2 CPU processes on gloo against one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from condkernels.nn import ChannelGate, GateLosses

WORLD = 2
ROWS = (5, 3)


class TwoGates(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ChannelGate(4, 6, init_bias=0.0), ChannelGate(4, 3, init_bias=0.0)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def _setup():
    torch.manual_seed(0)
    model = TwoGates().double().eval()  # eval: gate logits do not depend on the batch split
    x = torch.randn(sum(ROWS), 4, 2, 2, dtype=torch.float64)
    return model, x


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, x = _setup()
        start = sum(ROWS[:rank])
        model(x[start : start + ROWS[rank]])
        losses = GateLosses(model, process_group=dist.group.WORLD)(10.0)
        results[rank] = losses["batch_shaping"].item()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_shaping_over_the_global_batch():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    model, x = _setup()
    model(x)
    whole = GateLosses(model)(10.0)["batch_shaping"].item()
    model(x[: ROWS[0]])
    local = GateLosses(model)(10.0)["batch_shaping"].item()
    assert local != pytest.approx(whole)  # the split matters, so the test can tell
    for rank in range(WORLD):
        assert results[rank] == pytest.approx(whole, rel=1e-12)
