"""reference.checkpoint: safetensors + JSON training checkpoints that resume exactly (no pickle)."""

import os

import torch
from safetensors import safe_open

from reference.checkpoint import load_checkpoint, save_checkpoint


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.Generator().manual_seed(1)


def train(model, opt, g, steps):
    for _ in range(steps):
        loss = model(torch.randn(16, 4, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_continues_exactly(tmp_path):
    model, opt, g = make()
    train(model, opt, g, 5)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, g = make()
    train(model, opt, g, 3)
    save_checkpoint(str(tmp_path), "run", modules={"model": model}, optimizer=opt, generator=g, step=3, note="x")
    assert not [f for f in os.listdir(tmp_path) if f != "run.safetensors"]  # no temporary file left behind
    with safe_open(tmp_path / "run.safetensors", "pt") as f:
        assert "model.0.weight" in f.keys() and "rng" in f.keys()

    model, opt, g = make()  # fresh objects, different RNG position
    meta = load_checkpoint(str(tmp_path), "run", modules={"model": model}, optimizer=opt, generator=g)
    assert meta["step"] == 3 and meta["note"] == "x"
    train(model, opt, g, 2)
    assert all(torch.equal(a, b) for a, b in zip(straight, model.parameters()))


def test_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(str(tmp_path), "absent") is None
