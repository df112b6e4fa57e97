"""The multiscale DEQ (``dk.zoo.MDEQ``): shapes, fusion, contractivity at init, residual
reporting, a short training run on digits, argument errors (issue 18, part 3)."""

from __future__ import annotations

import pytest
import torch

import deqkit as dk
from deqkit.zoo import MDEQ, MultiscaleCell, build_model, hyperparameters


def _flat_cell(model: MDEQ, x: torch.Tensor):
    """``(f, z*)``: the model's cell as a map of the flattened state, and its equilibrium."""
    z0, z1 = model.deq.last_solution.value
    u0 = model.stem(x)
    u1 = model.stem_down(u0)
    n0 = z0[0].numel()

    def f(flat):
        out = model.deq.cell((flat[:, :n0].reshape(z0.shape), flat[:, n0:].reshape(z1.shape)),
                             u0, u1)
        return torch.cat([o.flatten(1) for o in out], 1)

    return f, torch.cat([z0.flatten(1), z1.flatten(1)], 1).detach()


@pytest.mark.parametrize("head", ["flatten", "pool"])
def test_shapes_images_and_signals(head):
    torch.manual_seed(0)
    model = MDEQ((1, 8, 8), 10, channels=(4, 8), groups=2, head=head)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    z0, z1 = model.deq.last_solution.value
    assert z0.shape == (3, 4, 8, 8) and z1.shape == (3, 8, 4, 4)
    if head == "flatten":  # both resolutions feed the linear head
        assert model.head.in_features == 4 * 64 + 8 * 16
    signal = MDEQ((2, 9), 5, channels=(4, 4), groups=2, head=head)  # 1-D, odd length
    assert isinstance(signal.stem[0], torch.nn.Conv1d)
    assert signal(torch.randn(2, 2, 9)).shape == (2, 5)
    assert [tuple(t.shape[1:]) for t in signal.deq.last_solution.value] == [(4, 9), (4, 5)]


def test_gradients_reach_every_scale_and_fusion_is_used():
    torch.manual_seed(0)
    model = MDEQ((1, 8, 8), 3, channels=(4, 8), groups=2).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model(x).square().sum().backward()
    cell = model.deq.cell
    for name, mod in [("block0", cell.block0), ("block1", cell.block1), ("up", cell.up),
                      ("down", cell.down), ("stem_down", model.stem_down)]:
        g = sum(float(p.grad.abs().sum()) for p in mod.parameters())
        assert g > 0, f"no gradient reaches {name}"
    # the half-resolution input moves the full-resolution equilibrium only through fusion
    model.deq.solver = dk.Anderson(m=5, rtol=1e-11, atol=0)  # float64, tight
    model.deq.eval_max_steps = 200
    model.eval()
    with torch.no_grad():
        u0 = model.stem(x)
        u1 = model.stem_down(u0)
        du1 = torch.randn_like(u1)  # (a constant shift would vanish in the GroupNorm)
        z0a, _ = model.deq(u0, u1)
        z0b, _ = model.deq(u0, u1 + du1)
        assert (z0a - z0b).abs().max() > 1e-3
        cell.up[0].weight.zero_()  # cut the half -> full path
        z0c, _ = model.deq(u0, u1)
        z0d, _ = model.deq(u0, u1 + du1)
        assert (z0c - z0d).abs().max() < 1e-8


def test_sum_fusion_is_contractive_at_init():
    # the GroupNorm after the fusion convs ("normalized", the old cell) undoes their small
    # initialisation: full-strength coupling and rho(J) near 1; the un-normalised sum starts
    # as two nearly independent residual blocks
    rho = {}
    for fusion in ("sum", "normalized"):
        torch.manual_seed(0)
        x = torch.randn(8, 1, 8, 8)
        model = MDEQ((1, 8, 8), 10, fusion=fusion).eval()
        with torch.no_grad():
            model(x)
        rho[fusion] = dk.jacobian_spectral_radius(*_flat_cell(model, x), krylov_dim=30)
    assert float(rho["sum"].max()) < 0.85, rho["sum"]
    assert float(rho["normalized"].mean()) > 0.85, rho["normalized"]


def test_equilibrium_residual_is_reported():
    torch.manual_seed(0)
    model = MDEQ((1, 8, 8), 10, solver=dk.Anderson(m=5, rtol=1e-4)).eval()
    with torch.no_grad():
        model(torch.randn(5, 1, 8, 8))
    sol = model.deq.last_solution
    st = sol.stats
    assert sol.result is dk.RESULTS.successful, sol.summary()
    assert st["rel_residual"].shape == (5,) and bool(st["converged"].all())
    assert float(st["rel_residual"].max()) <= 1e-4
    assert int(st["nstep"].max()) <= model.deq.eval_max_steps
    # a too small budget is reported as unconverged, not hidden
    with torch.no_grad(), model.deq.overrides(eval_max_steps=2):
        model(torch.randn(5, 1, 8, 8))
    st = model.deq.last_solution.stats
    assert not bool(st["converged"].any()) and float(st["rel_residual"].min()) > 1e-4


def _train_digits(**kw) -> float:
    """Test accuracy after 3 epochs on 400 digits (deterministic, about 2 s)."""
    from deqkit.data import load_dataset

    splits = load_dataset("digits", seed=0)
    xtr, ytr = (t[:400] for t in splits.train.tensors)
    xte, yte = splits.test.tensors
    torch.manual_seed(0)
    model = MDEQ((1, 8, 8), 10, channels=(8, 16), groups=4,
                 solver=dk.Anderson(m=5, rtol=1e-3), max_steps=20, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    st = model.deq.last_solution.stats  # the 250 test samples
    print(f"{kw}: test acc {acc:.3f}, unconverged {1 - float(st['converged'].float().mean()):.3f}")
    return acc


def test_short_digits_training_reaches_floor():
    pytest.importorskip("sklearn")
    # the previous MDEQ (pooled head, normalised fusion: MDEQ(head="pool",
    # fusion="normalized")) reached 0.37 here, with 10 % of the test solves unconverged;
    # the flattened head with the normalised fusion 0.93; this model 0.96
    assert _train_digits() >= 0.95


def test_previous_architecture_is_kept_as_options():
    old = MDEQ((1, 8, 8), 10, head="pool", fusion="normalized")
    keys = set(old.state_dict())
    assert {"deq.cell.down.1.weight", "deq.cell.up.1.weight", "deq.cell.post0.weight",
            "features0.proj.weight", "features1.proj.weight"} <= keys
    new = MDEQ((1, 8, 8), 10)
    assert not any(k.startswith(("deq.cell.post", "features")) for k in new.state_dict())
    MDEQ((1, 8, 8), 10, head="pool", fusion="normalized").load_state_dict(old.state_dict())
    with pytest.raises(RuntimeError, match=r"head='pool', fusion='normalized'.*--model-arg head"):
        new.load_state_dict(old.state_dict())  # an old checkpoint names the fix
    assert {"head", "fusion", "dropout", "head_dropout"} <= set(hyperparameters(MDEQ))
    model = build_model("mdeq", (1, 40), 10, channels=(8, 8), groups=4, dropout=0.1,
                        head_dropout=0.1)
    model.train()
    assert model(torch.randn(3, 1, 40)).shape == (3, 10)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        (dict(channels=16), "`channels`"),
        (dict(channels=(16, 32, 64)), "`channels`"),
        (dict(channels=(16, 0)), "`channels`"),
        (dict(channels=(16, 30)), "`groups`"),
        (dict(groups=0), "`groups`"),
        (dict(head="max"), "`head`"),
        (dict(fusion="concat"), "`fusion`"),
        (dict(init_std=0.0), "`init_std`"),
        (dict(dropout=1.0), "`dropout`"),
        (dict(head_dropout=-0.1), "`head_dropout`"),
    ],
)
def test_construction_errors_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg) as err:
        MDEQ((1, 8, 8), 10, **kwargs)
    assert str(err.value).startswith("MDEQ: ")


def test_bad_shapes_and_cell_arguments():
    with pytest.raises(ValueError, match="in_shape"):
        MDEQ((64,), 10)
    with pytest.raises(ValueError, match="expected input"):
        MDEQ((1, 8, 8), 10, channels=(4, 8), groups=2)(torch.randn(2, 1, 6, 6))
    with pytest.raises(ValueError, match="MultiscaleCell: `spatial`"):
        MultiscaleCell((8, 16), groups=4, spatial=3)
    with pytest.raises(ValueError, match="MultiscaleCell: `fusion`"):
        MultiscaleCell((8, 16), groups=4, fusion="cat")
