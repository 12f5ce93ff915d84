"""The fused-loss Triton kernel's tiling (fastst/ops/triton/fused_loss.py, loss_tile): the tile a
program holds stays bounded whatever the upsampling factor, its column chunks cover every
full-resolution column that touches its gradient cells, and the cases that take several chunks
or the most cells per program give the reference's loss and gradient. Triton runs in its
interpreter without a GPU, on tiny maps."""
import itertools

import pytest
import torch

import fastst.ops as ops
from fastst.ops import _backend
from fastst.ops.loss_modes import BOOTSTRAP_HARD, BOOTSTRAP_TEACHER, MRKLD, REGION
from helpers import gen

pytestmark = pytest.mark.skipif("triton" not in _backend.available_backends(), reason="needs triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _fl():
    from fastst.ops.triton import fused_loss
    return fused_loss


GEOMETRIES = [(64, 128, 64, 128), (64, 128, 512, 1024), (65, 129, 513, 1025), (64, 128, 96, 192), (2, 40, 3, 45),
              (4, 4, 512, 512), (1, 1, 7, 9), (33, 65, 1024, 2048)]


@pytest.mark.parametrize("mode", [REGION, BOOTSTRAP_HARD, MRKLD, BOOTSTRAP_TEACHER])
@pytest.mark.parametrize("C", [2, 19, 60, 150, 255])
def test_tile_is_bounded_and_chunks_cover_the_span(mode, C):
    fl = _fl()
    limit = fl.TEACHER_TILE_ELEMENTS if mode == BOOTSTRAP_TEACHER else fl.TILE_ELEMENTS
    for (h, w, H, W), align in itertools.product(GEOMETRIES, (True, False)):
        tile = fl.loss_tile(mode, C, h, w, H, W, align)
        assert tile.c_pad * tile.block_x <= max(limit, tile.c_pad * 4)
        per_thread = tile.c_pad * tile.block_x // (32 * tile.num_warps)
        assert per_thread <= fl.ELEMENTS_PER_THREAD, (h, w, H, W, tile)
        if not tile.resize:
            assert tile.x_chunks == 1 and tile.rows == 1
            continue
        bj_pad = 1 << (tile.block_j - 1).bit_length()
        assert tile.c_pad * bj_pad <= max(fl.MAX_CELLS, tile.c_pad)
        _, span = fl._axis_plan(w, W, align, tile.block_j)
        assert span <= tile.x_chunks * tile.block_x < span + tile.block_x


def _region(backend, logits, target, align):
    x = logits.to(DEVICE if backend == "triton" else "cpu").clone().requires_grad_(True)
    parts = ops.region_loss(x, target.to(x.device), size=tuple(target.shape[1:]), align_corners=align,
                            return_parts=True, backend=backend)
    parts[0].backward()
    return torch.stack([p.detach() for p in parts]).double().cpu(), x.grad.double().cpu()


def _teacher(backend, logits, teacher, lambdas, size):
    d = DEVICE if backend == "triton" else "cpu"
    x = logits.to(d).clone().requires_grad_(True)
    loss = ops.bootstrap_loss(x, None, lambdas.to(d), teacher_logits=teacher.to(d), size=size, backend=backend)
    loss.backward()
    return loss.detach().double().cpu().reshape(1), x.grad.double().cpu()


def _close(got, want, rtol=2e-5):
    (value, grad), (want_value, want_grad) = got, want
    assert torch.allclose(value, want_value, rtol=rtol, atol=1e-6), (value, want_value)
    assert float((grad - want_grad).abs().max()) <= 1e-4 * float(want_grad.abs().max())


# (B, C, h, w, H, W, align_corners, what the tile must show)
REGION_CASES = [
    (1, 150, 2, 3, 5, 13, True, "chunks"),     # C_PAD 256: 8 columns per chunk, a cell reaches ~10
    (2, 4, 2, 40, 3, 45, False, "cells"),      # C_PAD 16, 1.1x: MAX_CELLS / 16 = 32 cells per program
    (1, 3, 2, 2, 4, 300, True, "chunks"),      # 150x in x: one cell's columns need 3 chunks of 128
]


@pytest.mark.parametrize("case", REGION_CASES, ids=lambda c: c[-1] + "-" + "x".join(map(str, c[:6])))
def test_region_loss_with_chunks_or_capped_cells_equals_reference(case):
    B, C, h, w, H, W, align, what = case
    tile = _fl().loss_tile(REGION, C, h, w, H, W, align)
    if what == "chunks":
        assert tile.x_chunks > 1, tile
    else:
        assert tile.block_j == _fl().MAX_CELLS // tile.c_pad, tile
    g = gen(C + W)
    logits = torch.randn(B, C, h, w, generator=g) * 3
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.3] = 255
    _close(_region("triton", logits, target, align), _region("torch", logits, target, align))


def test_teacher_mode_with_chunks_equals_reference():
    B, C, h, w, H, W = 1, 150, 2, 3, 5, 13
    tile = _fl().loss_tile(BOOTSTRAP_TEACHER, C, h, w, H, W, True)
    assert tile.x_chunks > 1 and tile.block_x == 4, tile
    g = gen(7)
    logits, teacher = torch.randn(B, C, h, w, generator=g) * 3, torch.randn(B, C, h, w, generator=g) * 3
    lambdas = torch.ones(C)  # q = p < 1: soft targets q ** gamma everywhere, no decision near a tie
    _close(_teacher("triton", logits, teacher, lambdas, (H, W)), _teacher("torch", logits, teacher, lambdas, (H, W)),
           rtol=1e-5)
