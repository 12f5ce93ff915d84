"""Shared test helpers: seeded inputs and mismatch reports."""
import torch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def probs(B, C, H, W, *, seed=0, sharpness=3.0, dtype=torch.float32):
    """Softmax of random logits: sharpness 0 gives flat maps, large values peaked ones."""
    logits = torch.randn(B, C, H, W, generator=gen(seed)) * sharpness
    return torch.softmax(logits, dim=1).to(dtype)


def mismatch(expected: torch.Tensor, actual: torch.Tensor) -> str:
    """Where and by how much two tensors differ, for assertion messages."""
    expected, actual = expected.cpu(), actual.cpu()
    if expected.shape != actual.shape:
        return f"shapes differ: {tuple(expected.shape)} vs {tuple(actual.shape)}"
    diff = expected.double() - actual.double()
    bad = (diff != 0) & ~(expected.double().isnan() & actual.double().isnan())
    if not bool(bad.any()):
        return "equal"
    where = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {bad.numel()} differ; first at {where}: expected "
            f"{expected[where].item()!r}, got {actual[where].item()!r}; max |diff| "
            f"{diff.abs()[bad].max().item():.3e}")
