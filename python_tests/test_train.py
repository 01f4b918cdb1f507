"""python -m condkernels.train: learning, 2 processes against 1, exact resume, reports, flags."""

import csv
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import condkernels
from condkernels.train import GlobalBatchNorm, lr_factor, model_kind, resolve
from condkernels.train.sync_bn import convert_sync_batchnorm
from condkernels.train.data import augmentation, random_crop_flip, synthetic
from condkernels.train.loop import main

torch.set_num_threads(1)

# the smallest CondConv network of the builders: CC-MobileNetV1 (0.25x, 2 experts) on 16x16 images
CC = ["--model", "cc_mobilenet_v1", "--width-mult", "0.25", "--num-experts", "2", "--synthetic",
      "--image-size", "16", "--threads", "1", "--no-progress"]
DEEPMOE = ["--model", "deepmoe_resnet56", "--synthetic", "--image-size", "16", "--threads", "1", "--no-progress"]
BAS = ["--model", "resnet20_bas", "--synthetic", "--image-size", "16", "--threads", "1", "--no-progress"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(tmp_path, name, argv):
    out = str(tmp_path / name)
    assert main(argv + ["--out", out]) == 0
    return out


def epoch_losses(out):
    """Mean step loss of each epoch, in order."""
    rows = read_csv(os.path.join(out, "steps.csv"))
    per_epoch = {}
    for r in rows:
        per_epoch.setdefault(int(float(r["epoch"])), []).append(float(r["loss"]))
    return [sum(per_epoch[e]) / len(per_epoch[e]) for e in sorted(per_epoch)]


def first_last_epoch_loss(out):
    losses = epoch_losses(out)
    return losses[0], losses[-1]


# --- learning and reports --------------------------------------------------------------------------


def test_cc_network_learns_and_writes_csv_and_png(tmp_path):
    epochs = 5
    # CondConv from block 13 on (the last two blocks and the classifier): it fits within a few
    # epochs, where the default (from block 7) needs more steps than a test can take
    out = run(tmp_path, "cc", CC + ["--model-arg", "cond_begin=13", "--synthetic-size", "128", "--batch-size", "16",
                                    "--epochs", str(epochs), "--lr", "0.05", "--no-augment"])
    losses = epoch_losses(out)
    first = losses[0]
    assert first == pytest.approx(math.log(10), abs=0.15)  # N(0, 0.01) classifier: chance level at first
    # Batches of 16 at this rate make a noisy descent whose last epoch can climb back by 0.1-0.2 (the
    # path differs with each CPU's rounding): the best later epoch is what shows the learning.
    assert min(losses[1:]) < first - 0.2

    rows = read_csv(os.path.join(out, "metrics.csv"))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert [int(r["step"]) for r in rows] == [8 * e for e in range(1, epochs + 1)]  # 128 // 16 steps an epoch
    for r in rows:
        assert 0 <= float(r["train_acc"]) <= 1 and 0 <= float(r["test_acc"]) <= 1
        assert float(r["train_loss"]) == pytest.approx(float(r["train_ce"]))  # CondConv: cross-entropy only
        assert r["train_density"] == "" and r["test_density"] == ""  # no gates
    model = condkernels.models.cc_mobilenet_v1(0.25, 2, num_classes=10, cond_begin=13)
    assert int(rows[0]["macs"]) == condkernels.utils.count_macs(model, (3, 16, 16))
    # the cosine schedule ends at 0
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-12)
    with open(os.path.join(out, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 10_000


def test_bas_network_learns_and_reports_gates(tmp_path):
    out = run(tmp_path, "bas", BAS + ["--synthetic-size", "128", "--batch-size", "32", "--epochs", "4",
                                      "--lr", "0.05", "--no-augment"])
    first, last = first_last_epoch_loss(out)
    assert last < first - 0.1
    rows = read_csv(os.path.join(out, "metrics.csv"))
    for r in rows:
        assert 0 <= float(r["test_density"]) <= 1
        assert float(r["train_batch_shaping"]) >= 0 and float(r["train_l0"]) >= 0
        total = float(r["train_ce"]) + float(r["train_batch_shaping"]) + float(r["train_l0"])
        assert float(r["train_loss"]) == pytest.approx(total, rel=1e-5)


def test_deepmoe_network_learns_then_fine_tunes_with_frozen_gates(tmp_path):
    out = run(tmp_path, "moe", DEEPMOE + ["--synthetic-size", "64", "--batch-size", "16", "--epochs", "4",
                                          "--finetune-epochs", "1", "--lr", "0.05", "--no-augment"])
    first, last = first_last_epoch_loss(out)
    assert last < first - 0.1
    rows = read_csv(os.path.join(out, "metrics.csv"))
    for r in rows[:-1]:  # joint training: both DeepMoE terms are in the loss
        assert float(r["train_gate_l1"]) > 0 and float(r["train_embedding_ce"]) > 0
        total = float(r["train_ce"]) + float(r["train_gate_l1"]) + float(r["train_embedding_ce"])
        assert float(r["train_loss"]) == pytest.approx(total, rel=1e-5)
    # the fine-tuning epoch: cross-entropy alone, with the embedding network and gates frozen
    assert float(rows[-1]["train_loss"]) == pytest.approx(float(rows[-1]["train_ce"]))
    # the same run stopped before fine-tuning (3 epochs of 4 steps): gates and embedding did not move since
    before = run(tmp_path, "moe_before", DEEPMOE + ["--synthetic-size", "64", "--batch-size", "16", "--epochs", "4",
                                                     "--finetune-epochs", "1", "--lr", "0.05", "--no-augment",
                                                     "--max-steps", "12"])
    after = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    before = torch.load(os.path.join(before, "checkpoint.pt"), weights_only=False)["model"]
    frozen = [k for k in after if (k.startswith("embedding.") or ".gate" in k) and "num_batches" not in k]
    trained = [k for k in after if k.endswith("conv1.weight") and k.startswith("layer")]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in trained)


# --- exact resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    pytest.param(CC + ["--synthetic-size", "64", "--batch-size", "16", "--epochs", "3"], id="cc"),
    pytest.param(BAS + ["--synthetic-size", "64", "--batch-size", "16", "--epochs", "3"], id="bas"),
])
def test_checkpoint_resumes_to_the_same_next_steps_exactly(tmp_path, argv):
    # 4 steps an epoch: the interruption falls mid-epoch (step 6), the run goes on across an epoch end
    straight = run(tmp_path, "straight", argv + ["--max-steps", "10"])
    out = run(tmp_path, "resumed", argv + ["--max-steps", "6"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 2, 6)
    torch.rand(7)  # whatever happens in between must not matter
    assert main(argv + ["--max-steps", "10", "--out", out, "--resume"]) == 0

    a, b = read_csv(os.path.join(straight, "steps.csv")), read_csv(os.path.join(out, "steps.csv"))
    assert len(a) == len(b) == 10
    assert a == b  # every loss, lr and term, to the last digit
    assert read_csv(os.path.join(straight, "metrics.csv")) != []
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_csv(os.path.join(straight, "metrics.csv"))]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in read_csv(os.path.join(out, "metrics.csv"))]
    sa = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    sb = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_resume_refuses_another_setup(tmp_path, capsys):
    argv = CC + ["--synthetic-size", "32", "--batch-size", "16", "--epochs", "1", "--max-steps", "1"]
    out = run(tmp_path, "a", argv)
    with pytest.raises(SystemExit, match="--resume: the checkpoint has batch_size=16, this run 8"):
        main(CC + ["--synthetic-size", "32", "--batch-size", "8", "--epochs", "1", "--out", out, "--resume"])
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        main(argv + ["--out", str(tmp_path / "none"), "--resume"])


# --- two processes against one ---------------------------------------------------------------------

WORLD = 2
# no augmentation here: at 16x16 the last blocks of MobileNetV1 see 1x1 maps, and with zero-padded
# crops some BatchNorm channels have near-zero variance, which turns float summation-order differences
# into visibly different gradients; that the ranks' augmented batches are the single process's is
# checked exactly by test_ranks_together_see_the_single_process_batch
DDP_ARGV = CC + ["--synthetic-size", "64", "--batch-size", "16", "--epochs", "2", "--max-steps", "1", "--no-augment",
                 "--lr", "0.01"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64, generator=gen)
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, dtype=torch.float64, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(3, dtype=torch.float64, generator=gen))
    return x, bn


def _worker(rank, ports, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # GlobalBatchNorm on its own: rank r holds rows r*3..r*3+2 of the batch
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, bn = _bn_inputs()
        gbn = GlobalBatchNorm(3).double()
        gbn.load_state_dict(bn.state_dict())
        local = x[rank * 3:(rank + 1) * 3].clone().requires_grad_()
        y = gbn(local)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results[("bn", rank)] = (y.detach(), local.grad, gbn.weight.grad, gbn.running_mean, gbn.running_var)
    finally:
        dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh rendezvous: the first store may still hold its port
    main(DDP_ARGV + ["--out", out])  # initialises its own process group from the environment


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    out2 = str(tmp_path / "two")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=((_free_port(), _free_port()), out2, results), nprocs=WORLD, join=True)

    # GlobalBatchNorm against BatchNorm2d on the whole batch; the output weights differ per row
    # (arange over the whole tensor), so the gradient check covers the statistics' cross-rank terms
    x, bn = _bn_inputs()
    xg = x.clone().requires_grad_()
    y = bn(xg)
    weights = torch.cat([torch.arange(3 * 3 * 4 * 5, dtype=x.dtype).view(3, 3, 4, 5)] * 2)
    (y * weights).sum().backward()
    for rank in range(WORLD):
        got_y, got_gx, got_gw, got_rm, got_rv = results[("bn", rank)]
        torch.testing.assert_close(got_y, y[rank * 3:(rank + 1) * 3].detach())
        torch.testing.assert_close(got_gx, xg.grad[rank * 3:(rank + 1) * 3])
        torch.testing.assert_close(got_rm, bn.running_mean)
        torch.testing.assert_close(got_rv, bn.running_var)
    torch.testing.assert_close(results[("bn", 0)][2] + results[("bn", 1)][2], bn.weight.grad)

    out1 = run(tmp_path, "one", DDP_ARGV)
    one, two = read_csv(os.path.join(out1, "steps.csv")), read_csv(os.path.join(out2, "steps.csv"))
    assert len(one) == len(two) == 1
    assert float(two[0]["loss"]) == pytest.approx(float(one[0]["loss"]), rel=1e-5)
    assert not os.path.exists(os.path.join(out2, "steps.csv.tmp"))
    s1 = torch.load(os.path.join(out1, "checkpoint.pt"), weights_only=False)
    s2 = torch.load(os.path.join(out2, "checkpoint.pt"), weights_only=False)
    assert s2["world_size"] == 2 and len(s2["rng"]) == 2
    # One update: the same parameters and BatchNorm statistics up to float32 rounding. This small
    # network's float32 gradients are themselves far from the float64 ones -- BatchNorm over few
    # values amplifies rounding -- so after a step of lr 0.01 the two runs may differ by a few 1e-3;
    # a wrong reduction over the ranks (a factor of 2) would differ by several times the bound.
    # The exact check is the float64 test below (see docs/training.md).
    for k, v in s1["model"].items():
        torch.testing.assert_close(s2["model"][k], v, rtol=1e-3, atol=1e-2, msg=k)


def _float64_gradient_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = convert_sync_batchnorm(_float64_resnet20())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _float64_batch()
        half = slice(rank * 8, (rank + 1) * 8)
        F.cross_entropy(ddp(x[half]), y[half]).backward()
        results[rank] = {k: p.grad.clone() for k, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def _float64_resnet20():
    torch.manual_seed(0)
    return condkernels.models.resnet20().double().train()


def _float64_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 16, 16, dtype=torch.float64, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def test_two_processes_give_the_single_process_gradient_in_float64():
    """DDP + BatchNorm over the global batch is the single-process gradient exactly; in float32 the
    runs drift apart over steps only through rounding (small-batch BatchNorm amplifies it)."""
    model = _float64_resnet20()
    x, y = _float64_batch()
    F.cross_entropy(model(x), y).backward()
    results = mp.Manager().dict()
    mp.spawn(_float64_gradient_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    converted = convert_sync_batchnorm(_float64_resnet20())
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    for rank in range(WORLD):
        for k, p in model.named_parameters():
            torch.testing.assert_close(results[rank][k], p.grad, rtol=1e-10, atol=1e-12, msg=k)


# --- pieces ----------------------------------------------------------------------------------------


def test_lr_schedules_follow_the_papers():
    args = resolve(["--model", "resnet18", "--synthetic", "--epochs", "500", "--lr-schedule", "step",
                    "--milestones", "300,375,450"])
    spe = 10
    assert [lr_factor(args, e * spe, spe) for e in (0, 299, 300, 374, 375, 449, 450, 499)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    args = resolve(["--model", "cc_mobilenet_v1", "--synthetic", "--epochs", "10", "--warmup-epochs", "2"])
    spe = 5  # 10 warm-up steps, then 40 of cosine decay
    assert lr_factor(args, 0, spe) == pytest.approx(0.1)
    assert lr_factor(args, 9, spe) == pytest.approx(1.0)
    assert lr_factor(args, 30, spe) == pytest.approx(0.5)
    assert lr_factor(args, 20, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_presets_scale_with_epochs():
    bas = resolve(["--model", "cc_mobilenet_v1", "--synthetic"])
    assert (bas.kind, bas.epochs, bas.lr_schedule, bas.batch_size) == ("cc", 200, "cosine", 128)
    # the batch-shaping schedule: lambda to 0 by 100/500, L0 from 100/500 to 300/500, lr steps at 300/375/450
    args = resolve(["--model", "resnet18", "--synthetic", "--epochs", "50"])
    args.kind = "bas"
    from condkernels.train.config import PRESETS
    p = PRESETS["bas"]
    assert [m * 50 for m in p.milestones] == pytest.approx([30, 37.5, 45])
    assert (args.bs_anneal_epochs, args.l0_start_epoch, args.l0_full_epoch) == pytest.approx((10, 10, 30))
    assert model_kind("resnet20_bas") == "bas" and model_kind("deepmoe_resnet56") == "deepmoe"
    assert model_kind("cc_resnet50") == "cc" and model_kind("mobilenet_v2") == "plain"


def test_augmentation_matches_a_per_example_crop_and_flip():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 6, 7, generator=gen)
    offsets, flips = augmentation(5, epoch=2, seed=9, pad=2)
    got = random_crop_flip(x, offsets, flips, pad=2)
    for i in range(5):  # independent reference: pad, slice, flip one example at a time
        want = F.pad(x[i], (2, 2, 2, 2))[:, offsets[i, 0]:offsets[i, 0] + 6, offsets[i, 1]:offsets[i, 1] + 7]
        if flips[i]:
            want = want.flip(-1)
        torch.testing.assert_close(got[i], want)
    again = augmentation(5, epoch=2, seed=9, pad=2)
    assert torch.equal(again[0], offsets) and torch.equal(again[1], flips)
    assert not torch.equal(augmentation(5, epoch=3, seed=9, pad=2)[0], offsets)


def test_ranks_together_see_the_single_process_batch():
    from condkernels.train.data import epoch_order, make_batch

    d = synthetic(64, 16, seed=0)
    aug = augmentation(64, epoch=1, seed=0, pad=2)
    for step in range(2):
        whole = torch.tensor(epoch_order(64, 1, 0, 0, 1))[step * 16:(step + 1) * 16]
        x1, y1 = make_batch(d.train, whole, d, 16, "cpu", aug, 2)
        by_index = {i: (x1[k], y1[k]) for k, i in enumerate(whole.tolist())}
        seen = []
        for rank in range(2):
            part = torch.tensor(epoch_order(64, 1, 0, rank, 2))[step * 8:(step + 1) * 8]
            x2, y2 = make_batch(d.train, part, d, 16, "cpu", aug, 2)
            for k, i in enumerate(part.tolist()):
                assert torch.equal(x2[k], by_index[i][0]) and y2[k] == by_index[i][1]
            seen += part.tolist()
        assert sorted(seen) == sorted(whole.tolist())


def test_synthetic_data_is_deterministic_and_class_dependent():
    a, b = synthetic(200, 16, seed=4), synthetic(200, 16, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.shape == (200, 16, 16, 3) and a.train.images.dtype == torch.uint8
    assert not torch.equal(synthetic(200, 16, seed=5).train.images, a.train.images)
    # nearest class mean classifies held-out examples far above chance
    x, y = a.train.images.float().flatten(1), a.train.labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    xt = a.test.images.float().flatten(1)
    accuracy = (torch.cdist(xt, means).argmin(1) == a.test.labels).float().mean()
    assert accuracy > 0.5


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "--synthetic"], "--model: unknown model 'nope'; choose from"),
    (["--model", "resnet18", "--synthetic", "--num-experts", "4"],
     "--num-experts: model resnet18 does not take num_experts"),
    (["--model", "resnet18", "--synthetic", "--width-mult", "0.5"],
     "--width-mult: model resnet18 does not take width_mult"),
    (["--model", "resnet18"], "one of --data DIR (CIFAR-10) or --synthetic is required"),
    (["--model", "resnet18", "--synthetic", "--data", "x"], "not allowed with argument"),
    (["--model", "resnet18", "--data", "/nonexistent"], "--data: no CIFAR-10 at /nonexistent/cifar-10-batches-py"),
    (["--model", "resnet18", "--synthetic", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--model", "resnet18", "--synthetic", "--lr", "-1"], "--lr must be a non-negative number"),
    (["--model", "resnet18", "--synthetic", "--image-size", "4"], "--image-size must be >= 8"),
    (["--model", "resnet18", "--synthetic", "--milestones", "5,a"], "--milestones: expected comma-separated numbers"),
    (["--model", "resnet18", "--synthetic", "--epochs", "10", "--milestones", "12"],
     "--milestones must lie in (0, --epochs=10]"),
    (["--model", "resnet18", "--synthetic", "--finetune-epochs", "2"], "--finetune-epochs: only DeepMoE networks"),
    (["--model", "resnet18", "--synthetic", "--l0-start-epoch", "5", "--l0-full-epoch", "2"],
     "--l0-start-epoch (5.0) and --l0-full-epoch (2.0)"),
    (["--model", "resnet18", "--synthetic", "--max-steps", "0"], "--max-steps must be >= 1"),
    (["--model", "resnet18", "--synthetic", "--model-arg", "cond_begin=3"],
     "--model-arg: model resnet18 takes no keyword 'cond_begin'"),
    (["--model", "cc_resnet50", "--synthetic", "--model-arg", "cond_begin"],
     "--model-arg: expected KEY=VALUE, got 'cond_begin'"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_size_must_split_over_the_processes(capsys):
    with pytest.raises(SystemExit):
        resolve(["--model", "resnet18", "--synthetic", "--batch-size", "15"], world_size=2)
    assert "--batch-size 15 (global) must be divisible by the 2 processes" in capsys.readouterr().err


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--batch-size 64 is larger than the 32 training examples"):
        main(CC + ["--synthetic-size", "32", "--batch-size", "64", "--out", str(tmp_path)])
