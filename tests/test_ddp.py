"""Two gloo processes on half a batch each reproduce one process on the whole batch.

BatchNorm runs in eval mode: per-process batch statistics legitimately differ; what is checked here is the
gathering math (SimCLR's negatives with gradient, MoCo's shuffle-BN bookkeeping, queue and masking).
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from sepp import distributed as D
from sepp.methods.mocov2 import MoCoV2
from sepp.methods.simclr import SimCLR

WORLD, GLOBAL_BATCH, STEPS, NUM_IMAGES = 2, 8, 2, 16
PAIRS = ([8, 9, 3, 15, 10], [1, 2, 12, 0, 4])


def make_model(method):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if method == "simclr":
        model = SimCLR(backbone, 4, proj_hidden_dim=8, proj_dim=4, temperature=0.5)
    else:
        model = MoCoV2(backbone, 4, proj_hidden_dim=8, proj_dim=4, queue_size=20, temperature=0.5,
                       momentum=0.9, symmetric=True, bn="shuffle")
        model.set_known_positives(torch.tensor(PAIRS[0]), torch.tensor(PAIRS[1]), NUM_IMAGES)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        ids1 = torch.arange(GLOBAL_BATCH) + step * GLOBAL_BATCH
        ids2 = ids1.clone()
        ids2[::3] = torch.randint(0, NUM_IMAGES, ids2[::3].shape, generator=g)  # some semantic-pair samples
        yield torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g), \
            ids1, ids2


def run(method):
    """Train STEPS SGD steps on this process's slice of each global batch; DDP-style gradient averaging."""
    rank, world = D.get_rank(), D.get_world_size()
    model = make_model(method)
    params = [p for p in model.parameters() if p.requires_grad]
    record = {"loss": [], "grads": [], "extra": []}
    for step, batch in enumerate(batches()):
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        out = model(*(t[rows] for t in batch))
        model.zero_grad()
        out["loss"].backward()
        grads = [p.grad.clone() for p in params]
        if world > 1:
            for g in grads:
                dist.all_reduce(g)
                g /= world
        record["loss"].append(D.all_reduce_mean(out["loss"]))
        record["grads"].append(grads)
        record["extra"].append({k: D.all_reduce_mean(v) for k, v in out.items() if k != "loss"})
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
        model.after_step((step + 1) / STEPS)
    record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return record


def worker(rank, init_file, method, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert D.broadcast_object({"rank": rank}) == {"rank": 0}
        assert D.all_gather(torch.tensor([rank])).tolist() == list(range(WORLD))
        torch.save(run(method), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def compare(method, tmp_path):
    reference = run(method)  # no process group: the single-process path
    mp.spawn(worker, args=(str(tmp_path / "init"), method, str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(STEPS):
            assert torch.allclose(got["loss"][step], reference["loss"][step], atol=1e-6), (rank, step)
            for g, r in zip(got["grads"][step], reference["grads"][step]):
                assert torch.allclose(g, r, atol=1e-6), (rank, step)
            for k, v in reference["extra"][step].items():
                assert torch.allclose(got["extra"][step][k], v), k
        for k, v in reference["state"].items():
            assert torch.equal(got["state"][k], v) if v.dtype == torch.long else torch.allclose(got["state"][k], v,
                                                                                                 atol=1e-6), k
    return reference


def test_simclr_two_processes_match_one(tmp_path):
    compare("simclr", tmp_path)


def test_mocov2_two_processes_match_one(tmp_path):
    reference = compare("mocov2", tmp_path)
    # The second step really masked negatives (the queue held partners of its queries).
    assert float(reference["extra"][1]["masked_negatives"]) > 0
    assert reference["state"]["queue.ids"].tolist().count(-1) == 0  # 2 steps x 16 keys wrapped the 20 slots


def test_helpers_are_single_process_no_ops(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed() == (0, 1, 0)
    assert (D.get_rank(), D.get_world_size(), D.is_main()) == (0, 1, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    assert torch.equal(D.all_gather(x), x) and not D.all_gather(x).requires_grad
    assert D.broadcast_object([1, "a"]) == [1, "a"] and torch.equal(D.all_reduce_mean(x), x)
    D.barrier()
    D.cleanup()
