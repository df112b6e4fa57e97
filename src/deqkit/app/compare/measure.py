"""The measurements of ``deqkit compare``: one function per property of the document's table."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import deqkit as dk
from deqkit.app import names
from deqkit.zoo import DEQMLP, NeuralODEClassifier, ResNetMLP, UnrolledMLP

from .memory import fit_slope, peak_live_bytes, saved_tensor_bytes
from .models import f_evals

# --------------------------------------------------------------------------------------------
# 1. forward computation and 3. effective depth


@torch.no_grad()
def forward_cost(model: nn.Module, x: Tensor, repeats: int = 5) -> dict[str, float]:
    """Cell evaluations per forward pass (eval mode) and inference wall time per sample
    (median over ``repeats`` passes over ``x``)."""
    model.eval()
    model(x)  # warm-up
    nfev = f_evals(model)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return {"f_evals": nfev, "infer_s_per_sample": statistics.median(times) / len(x),
            "batch": len(x)}


@torch.no_grad()
def effective_depth(model: nn.Module, x: Tensor, batch: int = 250) -> dict[str, Any]:
    """Depth actually used on ``x`` (eval mode): ``layers`` for explicit/unrolled models,
    mean/max solver steps per sample for a DEQ, mean function evaluations (NFE) for a Neural
    ODE (adaptive solver)."""
    model.eval()
    if isinstance(model, ResNetMLP):
        return {"kind": "layers", "mean": float(model.depth), "max": float(model.depth)}
    if isinstance(model, UnrolledMLP):
        return {"kind": "layers (tied)", "mean": float(model.depth), "max": float(model.depth)}
    vals: list[float] = []
    if isinstance(model, NeuralODEClassifier):
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
            vals.append(float(model.nfe))
        return {"kind": "ODE NFE", "mean": statistics.fmean(vals), "max": max(vals)}
    steps, converged = [], []
    for i in range(0, len(x), batch):
        model(x[i:i + batch])
        st = model.deq.last_solution.stats
        steps.append(st["nstep"].float())
        converged.append(st["converged"])
    s = torch.cat(steps)
    return {"kind": "solver steps", "mean": float(s.mean()), "max": float(s.max()),
            "converged_frac": float(torch.cat(converged).float().mean())}


# --------------------------------------------------------------------------------------------
# 2. memory


def _loss(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, y)


def memory_of(forward: Callable[[Tensor], Tensor], params: Sequence[Tensor], x: Tensor,
              y: Tensor) -> dict[str, int]:
    """Memory of one inference pass and one training step (forward + loss + backward) of
    ``forward`` on ``(x, y)``: saved-for-backward bytes and peak live bytes (profiler)."""
    params = list(params)
    with torch.no_grad():
        forward(x)  # warm-up (lazy initialisations)

    def infer() -> None:
        with torch.no_grad():
            forward(x)

    def step() -> None:
        _loss(forward(x), y).backward()

    saved, loss = saved_tensor_bytes(lambda: _loss(forward(x), y), exclude=[*params, x])
    del loss
    peak_inf, _ = peak_live_bytes(infer)
    step()  # warm-up
    for p in params:  # gradients are allocated inside the measured step
        p.grad = None
    peak_train, _ = peak_live_bytes(step)
    for p in params:
        p.grad = None
    return {"saved_bytes": saved, "peak_infer_bytes": peak_inf, "peak_train_bytes": peak_train}


def clone_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of a model, leaving out the DEQ layers' record of their latest solve
    (it holds non-leaf tensors, which cannot be deep-copied)."""
    stash = []
    for mod in model.modules():
        for attr in ("last_solution", "_last_call"):
            if getattr(mod, attr, None) is not None:
                stash.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, None)
    try:
        return copy.deepcopy(model)
    finally:
        for mod, attr, v in stash:
            setattr(mod, attr, v)


class ForcedSteps(nn.Module):
    """A copy of a trained DEQ model (:class:`~deqkit.zoo.DEQMLP`) that runs exactly ``steps``
    updates of ``solver`` (``dk.FixedSteps``: no tolerance test, no early stop), with the
    model's own adjoint or ``adjoint``, and does not raise on failure.

    The settings are applied through :meth:`deqkit.nn.DEQ.overrides` around every call, so the
    copy's own configuration is never changed; the copy keeps the spectral-normalisation state
    of the trained model untouched by the measurements (training-mode calls update it).
    """

    def __init__(self, model: nn.Module, steps: int, solver: dk.AbstractFixedPointSolver,
                 adjoint: dk.AbstractAdjoint | None = None) -> None:
        super().__init__()
        self.model = clone_model(model)
        self.steps = steps
        self.settings: dict[str, Any] = dict(solver=dk.FixedSteps(solver), adjoint=adjoint,
                                             max_steps=steps, eval_max_steps=steps, throw=False)

    @property
    def deq(self) -> dk.nn.DEQ:
        """The DEQ layer of the wrapped copy (``deq.last_solution`` after a call)."""
        return self.model.deq

    def forward(self, x: Tensor) -> Tensor:
        with self.model.deq.overrides(**self.settings):
            return self.model(x)


def forced_steps(model: nn.Module, steps: int, solver: str = "anderson",
                 backward: str | None = None) -> ForcedSteps:
    """:class:`ForcedSteps` of ``model`` with the registry's ``solver`` (Anderson with the
    trained memory m = 5, or Picard) and, with ``backward`` (a linear solver name such as
    ``"neumann"``), an implicit adjoint using it instead of the trained adjoint."""
    fwd = names.build_solver(solver, **({"m": 5} if solver == "anderson" else {}))
    adj = None
    if backward is not None:  # e.g. Neumann: O(1) workspace, no Krylov basis
        lin = names.build_linear_solver(backward, rtol=1e-4, atol=1e-8, max_steps=100)
        adj = names.build_adjoint("implicit", linear_solver=lin)
    return ForcedSteps(model, steps, fwd, adj)


def memory_sweep(
    factories: dict[str, Callable[[int], Callable[[Tensor], Tensor] | nn.Module]],
    depths: Iterable[int],
    x: Tensor,
    y: Tensor,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Memory vs depth/steps: ``factories[name](L)`` returns a module (or a forward callable
    with ``.parameters``) using ``L`` layers/steps. Fits the slope (bytes per layer/step) of
    every measure by least squares."""
    depths = list(depths)
    out: dict[str, Any] = {}
    for name, make in factories.items():
        rows = []
        for L in depths:
            torch.manual_seed(0)
            m = make(L)
            if isinstance(m, nn.Module):
                m.train()
            r = memory_of(m, list(m.parameters()), x, y)  # type: ignore[union-attr]
            r["depth"] = L
            stats = getattr(getattr(m, "deq", None), "last_solution", None)
            if stats is not None:
                r["steps_used"] = float(stats.stats["nstep"].float().mean())
            rows.append(r)
            if progress:
                progress(f"memory {name:<13} L={L:<3} saved {r['saved_bytes'] / 1024:8.1f} KiB"
                         f"  peak train {r['peak_train_bytes'] / 1024:8.1f} KiB")
        fits = {k: fit_slope(depths, [r[k] for r in rows])
                for k in ("saved_bytes", "peak_infer_bytes", "peak_train_bytes")}
        out[name] = {"rows": rows, "fit": fits}
    return out


class _ODEFixedStep(nn.Module):
    """A Neural ODE integrated with ``n`` fixed RK4 steps (direct backprop or adjoint)."""

    def __init__(self, model: NeuralODEClassifier, n: int, adjoint: bool) -> None:
        super().__init__()
        self.model, self.n, self.adjoint = model, n, adjoint

    def forward(self, x: Tensor) -> Tensor:
        return self.model.integrate(x, adjoint=self.adjoint, method="rk4",
                                    options={"step_size": self.model.t_final / self.n})


def sweep_factories(models: dict[str, nn.Module], width: int, in_shape: tuple[int, ...],
                    num_classes: int, full: bool = True) -> dict[str, Callable[[int], nn.Module]]:
    """Depth-parametrised versions of the compared models (same width ``width`` for all):
    ResNet with L blocks, tied cell unrolled L times, DEQ forced to run L solver steps
    (Anderson, as trained, and Picard, both with an unreachable tolerance; the trained
    implicit GMRES backward, and a Neumann implicit backward), ODE with L fixed RK4 steps.
    ``full=False`` leaves out the JFB and phantom DEQs."""
    fac: dict[str, Callable[[int], nn.Module]] = {
        "resnet": lambda L: ResNetMLP(in_shape, num_classes, width=width, depth=L,
                                      activation="tanh"),
        "unrolled": lambda L: UnrolledMLP(in_shape, num_classes, depth=L, width=width),
    }
    deq = models.get("deq_implicit") or DEQMLP(in_shape, num_classes, width=width)
    fac["deq_implicit"] = lambda L: forced_steps(deq, L)
    fac["deq_implicit_picard"] = lambda L: forced_steps(deq, L, "picard")
    fac["deq_neumann_picard"] = lambda L: forced_steps(deq, L, "picard", "neumann")
    for kind in ("jfb", "phantom") if full else ():
        if f"deq_{kind}" in models:
            fac[f"deq_{kind}"] = lambda L, m=models[f"deq_{kind}"]: forced_steps(m, L)
    if "deq_reversible" in models:  # its own solver: the adjoint rebuilds those steps
        fac["deq_reversible"] = lambda L, m=models["deq_reversible"]: forced_steps(
            m, L, "reversible")
    node = models.get("node_adjoint") or NeuralODEClassifier(in_shape, num_classes, width=width)
    fac["node_direct"] = lambda L: _ODEFixedStep(node, L, adjoint=False)
    fac["node_adjoint"] = lambda L: _ODEFixedStep(node, L, adjoint=True)
    return fac


# --------------------------------------------------------------------------------------------
# 5. training speed


def training_speed(train_result: dict[str, Any], target: float) -> dict[str, Any]:
    """Median time per training step and the training wall time at which the validation
    accuracy first reached ``target`` (None: not reached)."""
    reached = None
    for h in train_result["history"]:
        if h["val_acc"] >= target:
            reached = h["time"]
            break
    return {"step_s_median": statistics.median(train_result["step_times"]),
            "time_to_target_s": reached, "target": target,
            "train_time_s": train_result["train_time"]}


# --------------------------------------------------------------------------------------------
# 6. gradient accuracy


def gradient_error(grads: Sequence[Tensor], ref: Sequence[Tensor]) -> dict[str, float]:
    """Relative error ``||g - g_ref|| / ||g_ref||`` and cosine similarity of the concatenated
    gradients."""
    g = torch.cat([t.detach().flatten().double() for t in grads])
    r = torch.cat([t.detach().flatten().double() for t in ref])
    rel = float((g - r).norm() / r.norm().clamp_min(1e-300))
    cos = float(torch.nn.functional.cosine_similarity(g, r, dim=0))
    return {"rel_err": rel, "cosine": cos}


def _grads_timed(loss_fn: Callable[[], Tensor], params: list[Tensor],
                 repeats: int = 1) -> tuple[list[Tensor], float, float]:
    fwd, bwd, grads = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(loss, params)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    assert grads is not None
    return list(grads), statistics.median(fwd), statistics.median(bwd)


def _deq_adjoints(tolerances: Iterable[float]) -> list[tuple[str, float | None,
                                                             dk.AbstractAdjoint]]:
    """(method, tolerance, adjoint) of the gradient study, the reference first."""
    dense = names.build_linear_solver("dense")
    out: list[tuple[str, float | None, dk.AbstractAdjoint]] = [
        ("implicit Dense (reference)", None, names.build_adjoint("implicit",
                                                                 linear_solver=dense))]
    for tol in tolerances:
        gmres = names.build_linear_solver("gmres", rtol=tol, atol=0.0, max_steps=200,
                                          restart=64)
        out.append(("implicit GMRES", tol, names.build_adjoint("implicit", linear_solver=gmres)))
    out.append(("JFB", None, names.build_adjoint("jfb")))
    out.append(("phantom(5, 0.5)", None, names.build_adjoint("phantom", phantom_steps=5,
                                                             phantom_damping=0.5)))
    # the backward reusing the forward: GMRES preconditioned by Anderson's inverse estimate
    # (same tolerance as the 1e-4 row: compare the products), and SHINE refined twice
    gmres = names.build_linear_solver("gmres", rtol=1e-4, atol=0.0, max_steps=200, restart=64)
    out.append(("implicit GMRES, reuse", 1e-4, names.build_adjoint(
        "implicit", linear_solver=gmres, reuse_forward=True)))
    out.append(("SHINE(2)", None, names.build_adjoint("shine", shine_refine=2)))
    return out


def deq_gradient_accuracy(model: DEQMLP, x: Tensor, y: Tensor,
                          tolerances: Iterable[float] = (1e-2, 1e-4, 1e-6, 1e-8),
                          repeats: int = 3) -> dict[str, Any]:
    """Parameter gradients of the DEQ (float64 copy of ``model``) for several adjoints vs the
    reference ``ImplicitAdjoint(Dense())``, all at the same tightly solved ``z*`` (Anderson,
    rtol 1e-12): GMRES at each backward tolerance, JFB, phantom(5, 0.5), GMRES at 1e-4
    preconditioned by the forward's inverse estimate, SHINE refined twice."""
    # eval mode: the spectral normalisation's power iteration runs only in training mode, so
    # every adjoint sees the same weights (autograd works the same in eval mode)
    m = clone_model(model).double().eval()
    x = x.double()
    params = [p for p in m.parameters() if p.requires_grad]
    tight = names.build_solver("anderson", m=5, rtol=1e-12, atol=0.0)
    rows: list[dict[str, Any]] = []
    ref: list[Tensor] = []
    fwd_stats: dict[str, Tensor] = {}
    with m.deq.overrides(solver=tight, max_steps=500, eval_max_steps=500, throw=False):
        for method, tol, adj in _deq_adjoints(tolerances):
            with m.deq.overrides(adjoint=adj):
                g, _, bwd = _grads_timed(lambda: _loss(m(x), y), params, repeats)
            row: dict[str, Any] = {"method": method, "tol": tol,
                                   **gradient_error(g, ref or g), "backward_s": bwd}
            if not ref:
                ref, fwd_stats = g, m.deq.last_solution.stats
            if method.startswith("implicit GMRES"):
                row["matvecs"] = int(m.deq.last_solution.backward.get("nmatvec", 0))
            rows.append(row)
    rows[0].update(rel_err=0.0, cosine=1.0)
    return {"rows": rows, "forward_rel_residual": float(fwd_stats["rel_residual"].max()),
            "forward_steps": float(fwd_stats["nstep"].float().mean()), "dtype": "float64",
            "batch": len(x)}


def ode_gradient_accuracy(model: NeuralODEClassifier, x: Tensor, y: Tensor,
                          tolerances: Iterable[float] = (1e-2, 1e-4, 1e-6, 1e-8),
                          repeats: int = 1) -> dict[str, Any]:
    """Parameter gradients of the Neural ODE (float64 copy) with ``odeint_adjoint`` and
    ``odeint`` (direct backprop) at rtol = atol = tol (dopri5) vs the reference ``odeint``
    direct backprop at rtol = atol = 1e-10."""
    m = clone_model(model).double().train()
    x = x.double()
    params = [p for p in m.parameters() if p.requires_grad]

    def run(adjoint: bool, tol: float) -> tuple[list[Tensor], float, float, int]:
        g, f, b = _grads_timed(lambda: _loss(m.integrate(x, adjoint=adjoint, method="dopri5",
                                                         rtol=tol, atol=tol), y), params, repeats)
        return g, f, b, int(m.func.nfe)

    ref, _, ref_bwd, ref_nfe = run(False, 1e-10)
    rows = [{"method": "odeint direct (reference)", "tol": 1e-10, "rel_err": 0.0,
             "cosine": 1.0, "backward_s": ref_bwd, "nfe_total": ref_nfe}]
    for adjoint in (True, False):
        for tol in tolerances:
            g, _, bwd, nfe = run(adjoint, tol)
            rows.append({"method": "odeint_adjoint" if adjoint else "odeint direct",
                         "tol": tol, **gradient_error(g, ref), "backward_s": bwd,
                         "nfe_total": nfe})
    return {"rows": rows, "dtype": "float64", "batch": len(x)}


def explicit_gradient_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Backprop gradient of an explicit/unrolled model in float32 vs the same model in
    float64 (the error of ordinary backpropagation is rounding only)."""
    m32 = clone_model(model).float().eval()
    m64 = clone_model(model).double().eval()
    p32 = [p for p in m32.parameters() if p.requires_grad]
    p64 = [p for p in m64.parameters() if p.requires_grad]
    g32 = torch.autograd.grad(_loss(m32(x.float()), y), p32)
    g64 = torch.autograd.grad(_loss(m64(x.double()), y), p64)
    return gradient_error(g32, g64)


__all__ = [
    "ForcedSteps",
    "deq_gradient_accuracy",
    "effective_depth",
    "explicit_gradient_accuracy",
    "forced_steps",
    "forward_cost",
    "gradient_error",
    "memory_of",
    "memory_sweep",
    "ode_gradient_accuracy",
    "sweep_factories",
    "training_speed",
]
