"""Losses against hand-computed values and a plain-Python brute force."""
import math

import torch
from hypothesis import given, settings, strategies as st

from sepp.methods.losses import byol_loss, info_nce, negative_cosine, nt_xent


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def close(a, b, tol=1e-5):
    a = float(a.detach()) if torch.is_tensor(a) else a
    assert abs(a - b) < tol, (a, b)


# ---- InfoNCE ---------------------------------------------------------------------------------------------

Q, K = t([[1, 0], [0, 1]]), t([[0.6, 0.8], [0, 1]])
QUEUE = t([[1, 0], [0, 1], [-1, 0]])


def test_info_nce_queue_by_hand():
    # T = 0.5. Query 0: positive 0.6/0.5 = 1.2, negatives 2, 0, -2. Query 1: positive 2, negatives 0, 2, 0.
    q0 = -1.2 + lse([1.2, 2, 0, -2])
    q1 = -2 + lse([2, 0, 2, 0])
    close(info_nce(Q, K, QUEUE, 0.5), (q0 + q1) / 2)


def test_info_nce_mask_drops_exactly_the_masked_negatives():
    mask = torch.tensor([[False, True, False], [True, False, True]])
    q0 = -1.2 + lse([1.2, 2, -2])       # negative (0, 1) removed
    q1 = -2 + lse([2, 2])               # negatives (1, 0) and (-1, 0) removed
    close(info_nce(Q, K, QUEUE, 0.5, neg_mask=mask), (q0 + q1) / 2)


def test_info_nce_in_batch_negatives_without_queue():
    # T = 1: query 0 logits [0.6, 0] (positive first), query 1 logits [0.8, 1] (positive second).
    close(info_nce(Q, K, None, 1.0), ((-0.6 + lse([0.6, 0])) + (-1 + lse([0.8, 1]))) / 2)


def test_info_nce_is_float32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(Q, K, QUEUE, 0.5)
    assert loss.dtype == torch.float32
    close(loss, float(info_nce(Q, K, QUEUE, 0.5)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(0, 10_000), st.floats(0.05, 1))
def test_info_nce_matches_brute_force(b, k, d, seed, temp):
    g = torch.Generator().manual_seed(seed)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    q, key, queue = unit(b), unit(b), unit(k)
    mask = torch.rand(b, k, generator=g) < 0.4
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))
    expected = 0.0
    for i in range(b):
        pos = dot(q[i].tolist(), key[i].tolist()) / temp
        negs = [dot(q[i].tolist(), queue[j].tolist()) / temp for j in range(k) if not mask[i, j]]
        expected += (-pos + lse([pos] + negs)) / b
    got = info_nce(q, key, queue, temp, neg_mask=mask)
    assert abs(float(got) - expected) < 1e-4 * max(1, abs(expected))


# ---- NT-Xent ---------------------------------------------------------------------------------------------

Z1, Z2 = t([[1, 0], [0, 1]]), t([[0.6, 0.8], [0.8, 0.6]])
# T = 1. Bank: z1_0 = (1, 0), z1_1 = (0, 1), z2_0 = (.6, .8), z2_1 = (.8, .6); z2_0 . z2_1 = 0.96.
A_Z1_0 = -0.6 + lse([0, 0.6, 0.8])      # vs z1_1, z2_0 (positive), z2_1
A_Z1_1 = -0.6 + lse([0, 0.8, 0.6])      # vs z1_0, z2_0, z2_1 (positive)
A_Z2_0 = -0.6 + lse([0.6, 0.8, 0.96])   # vs z1_0 (positive), z1_1, z2_1
A_Z2_1 = -0.6 + lse([0.8, 0.6, 0.96])   # vs z1_0, z1_1 (positive), z2_0


def test_nt_xent_by_hand():
    close(nt_xent(Z1, Z2, 1.0), (A_Z1_0 + A_Z1_1 + A_Z2_0 + A_Z2_1) / 4)


def test_nt_xent_normalises_and_scales_by_temperature():
    close(nt_xent(3 * Z1, 0.5 * Z2, 1.0), (A_Z1_0 + A_Z1_1 + A_Z2_0 + A_Z2_1) / 4)
    # T = 0.5 doubles every logit.
    expected = (-1.2 + lse([0, 1.2, 1.6])) * 2 + (-1.2 + lse([1.2, 1.6, 1.92])) * 2
    close(nt_xent(Z1, Z2, 0.5), expected / 4)


def test_nt_xent_offset_uses_local_anchors_only():
    close(nt_xent(Z1[1:], Z2[1:], 1.0, z1_all=Z1, z2_all=Z2, offset=1), (A_Z1_1 + A_Z2_1) / 2)
    close(nt_xent(Z1[:1], Z2[:1], 1.0, z1_all=Z1, z2_all=Z2, offset=0), (A_Z1_0 + A_Z2_0) / 2)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 5), st.integers(0, 1000), st.floats(0.1, 1))
def test_nt_xent_shards_average_to_the_global_loss(shards, rows, dim, seed, temp):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(shards * rows, dim, generator=g), torch.randn(shards * rows, dim, generator=g)
    parts = [nt_xent(z1[s * rows:(s + 1) * rows], z2[s * rows:(s + 1) * rows], temp, z1, z2, offset=s * rows)
             for s in range(shards)]
    # Brute force over all 2N anchors.
    zs = [torch.nn.functional.normalize(z, dim=0).tolist() for z in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        logits = {c: sum(x * y for x, y in zip(zs[a], zs[c])) / temp for c in range(2 * n) if c != a}
        total += -logits[pos] + lse(list(logits.values()))
    assert abs(float(sum(parts) / shards) - total / (2 * n)) < 1e-4


# ---- SimSiam / BYOL ----------------------------------------------------------------------------------------

def test_negative_cosine_value_and_stop_gradient():
    p = t([[3, 0], [0, 2]]).requires_grad_()
    z = t([[0.6, 0.8], [0, -5]]).requires_grad_()
    loss = negative_cosine(p, z)
    close(loss, (-0.6 + 1.0) / 2)
    loss.backward()
    assert z.grad is None
    # d(-cos)/dp for p = (3, 0), unit z = (.6, .8): -(z/|p| - (p.z) p/|p|^3) = (0, -0.8/3); halved by the mean.
    assert torch.allclose(p.grad[0], t([0, -0.8 / 3 / 2]), atol=1e-6)
    assert torch.allclose(p.grad[1], t([0, 0]), atol=1e-6)  # p and z anti-parallel: a stationary point


def test_byol_loss_value_and_stop_gradient():
    p = t([[1, 0], [2, 0]]).requires_grad_()
    z = t([[0.6, 0.8], [0, -2]]).requires_grad_()
    loss = byol_loss(p, z)
    close(loss, ((2 - 1.2) + 2) / 2)
    # 2 - 2cos is the squared distance of the normalised vectors: (1-.6)^2 + .8^2 = 0.8.
    close(loss, (((1 - 0.6) ** 2 + 0.8 ** 2) + (1 + 1)) / 2)
    loss.backward()
    assert z.grad is None and p.grad is not None
