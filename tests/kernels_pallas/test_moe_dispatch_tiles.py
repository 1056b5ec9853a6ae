"""The grouped matmuls' tile rules: the floor of 16, the shared-memory model and the tile chooser,
and the row ranges that keep tgmm's group mask off its unmasked loop.

Footprints are computed here by hand from the tile shapes (stages × elements × bytes), not by the
function under test.
"""

from types import SimpleNamespace

import pytest

from kernels_pallas.moe_dispatch import GmmConfig, smem_bytes, smem_limit_bytes
from kernels_pallas.moe_dispatch import pallas as P

KIB = 1024
H100, A100, L40S = 227 * KIB, 163 * KIB, 99 * KIB


def test_tiles_never_shrink_under_16():
    assert P._tile(128, 5) == 16  # a small dimension pads up to 16, not down to 8
    assert P._tile(128, 16) == 16
    assert P._tile(128, 17) == 32
    assert P._tile(64, 1000) == 64
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        GmmConfig(block_k=8)


def test_shared_memory_footprints_by_hand():
    default = GmmConfig()  # (128, 64, 128), 3 stages
    # gmm: lhs (128, 64) + rhs (64, 128) per stage.
    assert smem_bytes("gmm", default, 4) == 3 * (128 * 64 + 64 * 128) * 4 == 192 * KIB
    assert smem_bytes("gmm", default, 2) == 96 * KIB
    # tgmm: lhs (128, 64) + rhs (128, 128) per stage: the 288 KiB in float32.
    assert smem_bytes("tgmm", default, 4) == 3 * (128 * 64 + 128 * 128) * 4 == 288 * KIB
    assert smem_bytes("tgmm", default, 2) == 144 * KIB
    with pytest.raises(ValueError, match="product"):
        smem_bytes("matmul", default, 4)


@pytest.mark.parametrize(
    "product, itemsize, limit, want",
    [
        (
            "tgmm",
            4,
            H100,
            (64, 64, 128, 3),
        ),  # 288 KiB -> block_m 64: 3·(64·64 + 64·128)·4 = 144 KiB
        ("tgmm", 2, H100, (128, 64, 128, 3)),  # 144 KiB fits
        ("gmm", 4, H100, (128, 64, 128, 3)),  # 192 KiB fits
        ("gmm", 4, A100, (128, 32, 128, 3)),  # 192 > 163 -> block_k 32: 3·(128·32 + 32·128)·4 = 96
        ("tgmm", 4, A100, (64, 64, 128, 3)),  # 144 KiB fits 163
        ("tgmm", 4, L40S, (32, 64, 128, 3)),  # 144 > 99 -> block_m 32: 3·(32·64 + 32·128)·4 = 72
        ("gmm", 2, L40S, (128, 64, 128, 3)),  # 96 KiB fits 99
        # 40 KiB: block_k 32 (96 KiB), 2 stages (64), then block_m 64 (48), block_n 64 (32).
        ("gmm", 4, 40 * KIB, (64, 32, 64, 2)),
    ],
)
def test_fit_config_picks_tiles_under_the_limit(product, itemsize, limit, want):
    got = P.fit_config(product, itemsize, limit)
    assert (got.block_m, got.block_k, got.block_n, got.num_stages) == want
    assert smem_bytes(product, got, itemsize) <= limit


def test_fit_config_refuses_a_limit_nothing_fits():
    with pytest.raises(ValueError, match="limit"):
        P.fit_config("tgmm", 4, 4 * KIB)


def test_smem_limit_by_device():
    gpu = lambda cc: SimpleNamespace(platform="gpu", compute_capability=cc)  # noqa: E731
    assert smem_limit_bytes(gpu("9.0")) == H100
    assert smem_limit_bytes(gpu("8.0")) == A100
    assert smem_limit_bytes(gpu("8.9")) == L40S
    assert smem_limit_bytes(gpu("99.9")) == P.UNKNOWN_GPU_SMEM_BYTES
    assert smem_limit_bytes(SimpleNamespace(platform="cpu")) == H100  # interpret: an H100's


def test_tgmm_row_tiles_cover_each_tile_once_and_mask_only_the_edges():
    """Every group [start, end) of up to 5 tiles of 4 rows, against a brute-force listing."""
    tm = 4
    for start in range(0, 21):
        for end in range(start, 21):
            head, inside, tail = (
                range(int(lo), int(hi)) for lo, hi in P.tgmm_row_tiles(start, end, tm)
            )
            want = range(start // tm, -(-end // tm)) if end > start else range(0)
            assert sorted([*head, *inside, *tail]) == list(want), (start, end)
            for t in inside:  # wholly inside the group: no mask needed
                assert start <= t * tm and (t + 1) * tm <= end, (start, end, t)
            assert len(head) <= 1 and len(tail) <= 1, (start, end)
            for t in [*head, *tail]:  # each masked tile straddles an edge of the group
                assert t * tm < start or (t + 1) * tm > end, (start, end, t)
