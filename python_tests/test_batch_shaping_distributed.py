"""batch_shaping_loss over a process group: 2 CPU processes on gloo against one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import condkernels

WORLD = 2
ROWS = (5, 3)  # ranks may hold different batch sizes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(ROWS), 6, dtype=torch.float64, generator=gen)
    model = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=gen))
    return x, model


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, model = _inputs()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        start = sum(ROWS[:rank])
        local_x = x[start : start + ROWS[rank]]
        gates = torch.sigmoid(ddp(local_x))
        gates.retain_grad()
        loss = condkernels.batch_shaping_loss(gates, process_group=dist.group.WORLD)
        loss.backward()
        results[rank] = (loss.item(), gates.grad.clone(), [p.grad.clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_match_one_process_on_the_concatenated_batch():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)

    x, model = _inputs()
    gates = torch.sigmoid(model(x))
    gates.retain_grad()
    loss = condkernels.batch_shaping_loss(gates)
    loss.backward()
    for rank in range(WORLD):
        rank_loss, rank_gate_grad, rank_param_grads = results[rank]
        assert rank_loss == pytest.approx(loss.item(), rel=1e-13)
        # each rank's gates get the gradient of every rank's (identical) loss: WORLD x its own rows
        start = sum(ROWS[:rank])
        torch.testing.assert_close(rank_gate_grad, WORLD * gates.grad[start : start + ROWS[rank]])
        # after DDP averages, the parameters see exactly the single-process gradient
        for got, want in zip(rank_param_grads, model.parameters()):
            torch.testing.assert_close(got, want.grad)


def test_process_group_needs_initialised_default_group():
    assert not dist.is_initialized()
    message = "process_group was given but torch.distributed has no initialised default group"
    with pytest.raises(RuntimeError, match=message):
        condkernels.batch_shaping_loss(torch.rand(4, 2, dtype=torch.float64), process_group=object())
