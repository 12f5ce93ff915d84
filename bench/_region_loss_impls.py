"""The region-loss implementations the benchmarks compare (C = 19, IAST's lambdas):
- "cpp" / "triton": fastst.ops.region_loss with that backend (fused upsample, forward + gradient);
- "eager": the released formulation in eager PyTorch (F.interpolate, softmax, log_softmax,
  masked sums, as in the IAST code);
- "compile": torch.compile of "eager".
`region_loss_impl(name, lambda_kld=..., lambda_ent=...)` sets other lambdas for the fused ones
(0 turns a term off, and its work is skipped).
"""
import torch
import torch.nn.functional as F

from fastst.ops import region_loss

C = 19
LAMBDA_KLD, LAMBDA_ENT = 0.1, 3.0


def make_inputs(B, h, w, H, W, device="cpu", ignored="pixels"):
    """logits (B, 19, h, w) float32 and uint8 targets (B, H, W) with about 30 % ignored pixels:
    scattered at random (`ignored="pixels"`), or in whole 32 x 64 blocks (`"blocks"`, like the
    unlabelled regions of pseudo labels)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, h, w, generator=g) * 3
    target = torch.randint(0, C, (B, H, W), generator=g, dtype=torch.uint8)
    if ignored == "pixels":
        target[torch.rand(B, H, W, generator=g) < 0.3] = 255
    elif ignored == "blocks":
        blocks = torch.rand(B, -(-H // 32), -(-W // 64), generator=g) < 0.3
        target[blocks.repeat_interleave(32, 1).repeat_interleave(64, 2)[:, :H, :W]] = 255
    else:
        raise ValueError(f"ignored must be 'pixels' or 'blocks', got {ignored!r}")
    return logits.to(device), target.to(device)


def released_region_loss(logits, target):
    """IAST's loss as its code computes it, with the zero-count guard of docs/ops.md §2."""
    H, W = target.shape[-2:]
    if logits.shape[-2:] != (H, W):
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)
    log_p = F.log_softmax(logits, dim=1)
    p = F.softmax(logits, dim=1)
    t = target.long()
    valid = t != 255
    n_v = valid.sum().clamp(min=1)
    n_i = (~valid).sum().clamp(min=1)
    ce = F.nll_loss(log_p, t, ignore_index=255, reduction="sum") / n_v
    kld = (-log_p.sum(1) / C * valid).sum() / (C * n_v)
    ent = (-(p * log_p).sum(1) * ~valid).sum() / (C * n_i)
    return ce + LAMBDA_KLD * kld + LAMBDA_ENT * ent


def region_loss_impl(name, lambda_kld=LAMBDA_KLD, lambda_ent=LAMBDA_ENT):
    """A callable (logits, target) -> scalar loss for the implementation `name`; other lambdas
    only for the fused ones ("cpp", "triton")."""
    if name in ("cpp", "triton"):
        return lambda x, t: region_loss(x, t, lambda_kld=lambda_kld, lambda_ent=lambda_ent,
                                        size=t.shape[-2:], backend=name)
    if (lambda_kld, lambda_ent) != (LAMBDA_KLD, LAMBDA_ENT):
        raise ValueError(f"{name!r} has IAST's lambdas ({LAMBDA_KLD}, {LAMBDA_ENT}) only")
    if name == "eager":
        return released_region_loss
    if name == "compile":
        return torch.compile(released_region_loss, dynamic=False)
    raise ValueError(f"unknown implementation {name!r}")
