r"""Linear operators on batched vectors, the matrix-free Jacobian of a DEQ cell among them.

An operator is a batch of ``B`` independent linear maps :math:`A_b: \mathbb R^D \to \mathbb R^D`
acting on a ``(B, D)`` tensor row by row (block-diagonal over the batch).  It knows how to
apply itself (:meth:`~AbstractLinearOperator.mv`, :math:`A v`) and, where it can, its transpose
(:meth:`~AbstractLinearOperator.rmv`, :math:`A^\top u`).  Solvers in :mod:`deqkit.linear` take an
operator (or a plain ``matvec`` callable, wrapped in a :class:`FunctionOperator`).

The operators deqkit builds (modelled on lineax's operators):

- :class:`JacobianOperator`: :math:`J = \partial f / \partial z` of a batched map at a point,
  from autograd products, never materialised;
- :class:`IdentityMinus`: :math:`I - A` (the implicit backward system is
  ``IdentityMinus(J).transpose()``, a Newton step ``IdentityMinus(J)``);
- :class:`MatrixOperator`: an explicit ``(B, D, D)`` matrix;
- :class:`FunctionOperator`: a user's ``matvec`` (and optional ``rmatvec``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]

_JACOBIAN_HELP = "Pass JacobianOperator(fn, z) or JacobianOperator.from_evaluation(z, f(z))."


class AbstractLinearOperator(abc.ABC):
    r"""A batch of ``B`` linear maps on :math:`\mathbb R^D`, applied to ``(B, D)`` tensors.

    Row ``b`` of :math:`A v` depends only on row ``b`` of ``v`` (the samples are independent).
    Subclasses give :attr:`shape`, :attr:`dtype`, :attr:`device` and :meth:`mv`, and
    :meth:`rmv` where the transpose is available.  An operator is also callable
    (``op(v) == op.mv(v)``), so it can be passed wherever a ``matvec`` function is expected.

    Example:
        >>> import torch
        >>> from deqkit.linear import MatrixOperator
        >>> A = MatrixOperator(torch.tensor([[[1.0, 2.0], [0.0, 3.0]]], dtype=torch.float64))
        >>> v = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> A.shape, A.mv(v).tolist(), A.transpose().mv(v).tolist(), A.T(v).tolist()
        ((1, 2), [[3.0, 3.0]], [[1.0, 5.0]], [[1.0, 5.0]])
    """

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(B, D)``: the shape of the vectors the operator acts on."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The floating-point type of the operator's vectors."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device of the operator's vectors."""

    @abc.abstractmethod
    def mv(self, v: Tensor) -> Tensor:
        """:math:`A v` row by row, ``(B, D) -> (B, D)``."""

    def rmv(self, u: Tensor) -> Tensor:
        """:math:`A^\\top u` row by row, ``(B, D) -> (B, D)``; not every operator has it."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define rmv (products with its transpose). Use an "
            "operator that does (JacobianOperator, MatrixOperator, or FunctionOperator with "
            "rmatvec=...)."
        )

    @property
    def batch(self) -> int:
        """``B``, the number of independent systems."""
        return self.shape[0]

    @property
    def width(self) -> int:
        """``D``, the size of each system."""
        return self.shape[1]

    def transpose(self) -> AbstractLinearOperator:
        """The operator :math:`A^\\top` (its ``mv`` is this operator's ``rmv``)."""
        return _Transpose(self)

    @property
    def T(self) -> AbstractLinearOperator:
        """Shorthand for :meth:`transpose`."""
        return self.transpose()

    def as_matrix(self) -> Tensor:
        """The ``(B, D, D)`` matrices, from ``D`` calls of :meth:`mv` on unit vectors."""
        return assemble(self.mv, self.shape, self.dtype, self.device)

    def __call__(self, v: Tensor) -> Tensor:
        return self.mv(v)


def assemble(mv: MatVec, shape: tuple[int, int], dtype: torch.dtype,
             device: torch.device) -> Tensor:
    """The ``(B, D, D)`` matrices of ``mv``: column ``j`` is ``mv(e_j)``."""
    B, D = shape
    A = torch.empty(B, D, D, dtype=dtype, device=device)
    e = torch.zeros(B, D, dtype=dtype, device=device)
    for j in range(D):
        e[:, j] = 1.0
        A[:, :, j] = mv(e.clone())  # clone: mv may return (a view of) its input
        e[:, j] = 0.0
    return A


class _Transpose(AbstractLinearOperator):
    """:math:`A^\\top` of an operator that has ``rmv``."""

    def __init__(self, operator: AbstractLinearOperator) -> None:
        self.operator = operator

    shape = property(lambda self: self.operator.shape)
    dtype = property(lambda self: self.operator.dtype)
    device = property(lambda self: self.operator.device)

    def mv(self, v: Tensor) -> Tensor:
        return self.operator.rmv(v)

    def rmv(self, u: Tensor) -> Tensor:
        return self.operator.mv(u)

    def transpose(self) -> AbstractLinearOperator:
        return self.operator


class IdentityMinus(AbstractLinearOperator):
    r"""The operator :math:`I - A`, with :math:`(I - A)^\top = I - A^\top`.

    With :math:`A = J` the Jacobian of a DEQ cell :math:`f` at its equilibrium,
    ``IdentityMinus(J)`` is the Newton operator :math:`I - J` and
    ``IdentityMinus(J).transpose()`` the implicit backward operator :math:`I - J^\top`.

    Args:
        operator: the operator :math:`A` (an :class:`AbstractLinearOperator`).

    Raises:
        TypeError: if ``operator`` is not an operator.

    Example:
        >>> import torch
        >>> from deqkit.linear import IdentityMinus, MatrixOperator
        >>> A = MatrixOperator(torch.tensor([[[0.5, 0.25], [0.0, 0.5]]], dtype=torch.float64))
        >>> v = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> IdentityMinus(A).mv(v).tolist(), IdentityMinus(A).transpose().mv(v).tolist()
        ([[0.25, 0.5]], [[0.5, 0.25]])
    """

    def __init__(self, operator: AbstractLinearOperator) -> None:
        if not isinstance(operator, AbstractLinearOperator):
            raise TypeError(
                "IdentityMinus: `operator` must be a deqkit linear operator, got "
                f"{type(operator).__name__}. Wrap a function as FunctionOperator(matvec, like)."
            )
        self.operator = operator

    shape = property(lambda self: self.operator.shape)
    dtype = property(lambda self: self.operator.dtype)
    device = property(lambda self: self.operator.device)

    def mv(self, v: Tensor) -> Tensor:
        return v - self.operator.mv(v)

    def rmv(self, u: Tensor) -> Tensor:
        return u - self.operator.rmv(u)

    def transpose(self) -> AbstractLinearOperator:
        return IdentityMinus(self.operator.transpose())


class MatrixOperator(AbstractLinearOperator):
    r"""An explicit batch of matrices, :math:`(A v)_b = A_b v_b`.

    Args:
        matrix: a floating-point ``(B, D, D)`` tensor (use ``M.expand(B, D, D)`` to share one
            ``(D, D)`` matrix across the batch).

    Raises:
        ValueError: if ``matrix`` is not a floating-point ``(B, D, D)`` tensor.

    Example:
        >>> import torch, deqkit as dk
        >>> from deqkit.linear import MatrixOperator
        >>> A = MatrixOperator(torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64))[None])
        >>> dk.GMRES(rtol=1e-12).solve(A, torch.ones(1, 2, dtype=torch.float64)).value
        tensor([[0.5000, 0.2500]], dtype=torch.float64)
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 3 \
                or matrix.shape[1] != matrix.shape[2] or not matrix.is_floating_point():
            got = f"{matrix.dtype} {tuple(matrix.shape)}" if isinstance(matrix, Tensor) \
                else type(matrix).__name__
            raise ValueError(
                "MatrixOperator: `matrix` must be a floating-point (B, D, D) tensor, got "
                f"{got}. For one (D, D) matrix M pass e.g. M.expand(B, D, D)."
            )
        self.matrix = matrix

    shape = property(lambda self: (self.matrix.shape[0], self.matrix.shape[1]))
    dtype = property(lambda self: self.matrix.dtype)
    device = property(lambda self: self.matrix.device)

    def mv(self, v: Tensor) -> Tensor:
        return torch.bmm(self.matrix, v.unsqueeze(2)).squeeze(2)

    def rmv(self, u: Tensor) -> Tensor:
        return torch.bmm(u.unsqueeze(1), self.matrix).squeeze(1)

    def transpose(self) -> AbstractLinearOperator:
        return MatrixOperator(self.matrix.transpose(1, 2))

    def as_matrix(self) -> Tensor:
        return self.matrix


class FunctionOperator(AbstractLinearOperator):
    r"""An operator given by functions: ``mv = matvec`` and, optionally, ``rmv = rmatvec``.

    Args:
        matvec: maps a ``(B, D)`` tensor to :math:`A v` of the same shape, row by row.
        like: a ``(B, D)`` tensor giving the shape, dtype and device of the vectors (e.g. the
            right-hand side).
        rmatvec: maps ``u`` to :math:`A^\top u`, or ``None`` (then :meth:`rmv` raises).
            Default: ``None``.

    Raises:
        ValueError: if ``matvec``/``rmatvec`` are not callables or ``like`` is not ``(B, D)``.

    Example:
        >>> import torch
        >>> from deqkit.linear import FunctionOperator
        >>> d = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> op = FunctionOperator(lambda v: d * v, like=d)
        >>> op.shape, op.mv(torch.ones_like(d))
        ((1, 2), tensor([[1., 2.]], dtype=torch.float64))
    """

    def __init__(self, matvec: MatVec, like: Tensor, rmatvec: MatVec | None = None) -> None:
        if not callable(matvec) or (rmatvec is not None and not callable(rmatvec)):
            bad = matvec if not callable(matvec) else rmatvec
            raise ValueError(
                "FunctionOperator: `matvec` (and `rmatvec`) must be a callable mapping a (B, D) "
                f"tensor to a (B, D) tensor, got {type(bad).__name__}."
            )
        if not isinstance(like, Tensor) or like.dim() != 2:
            got = tuple(like.shape) if isinstance(like, Tensor) else type(like).__name__
            raise ValueError(f"FunctionOperator: `like` must be a (B, D) tensor, got {got}.")
        self.matvec, self.rmatvec = matvec, rmatvec
        self._shape = (like.shape[0], like.shape[1])
        self._dtype, self._device = like.dtype, like.device

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)

    def mv(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def rmv(self, u: Tensor) -> Tensor:
        if self.rmatvec is None:
            return super().rmv(u)
        return self.rmatvec(u)


class JacobianOperator(AbstractLinearOperator):
    r"""The Jacobian :math:`J = \partial f/\partial z` of a batched map at a point, matrix-free.

    ``f`` maps ``z`` of shape ``(B, ...)`` to the same shape, sample by sample, so :math:`J` is
    block diagonal with one :math:`D \times D` block per sample (``D`` the size of a sample).
    The operator acts on flat ``(B, D)`` vectors:

    .. math:: \mathrm{mv}(v) = J v, \qquad \mathrm{rmv}(u) = J^\top u.

    Two constructions, the same products:

    - ``JacobianOperator(fn, z)``: ``mv`` is one forward-mode product
      (``torch.func.jvp``; one evaluation of ``fn`` per call, so every op of ``fn`` needs a
      forward-mode rule).  ``rmv`` is a vector-Jacobian product through one evaluation
      :math:`f(z)` recorded with a graph at the first call and reused.
    - ``JacobianOperator.from_evaluation(z, fz)``: ``fz = f(z)`` was already computed with a
      graph from a ``z`` that requires grad.  ``rmv`` is one ``torch.autograd.grad`` through
      that graph (kept with ``retain_graph``); ``mv`` uses the double-VJP trick
      :math:`J v = \partial_w \langle J^\top w, v \rangle` (one extra backward graph, built at
      the first call; ``f`` must be twice differentiable backwards).  Linearising one
      evaluation gives one well-defined Jacobian even for a cell with side effects (dropout,
      power iterations).

    Given both ``fn`` and ``fz``, ``mv`` is forward mode and ``rmv`` goes through ``fz``.  A
    map that does not depend on ``z`` gives zeros.  The point and the evaluation it linearises
    are the attributes ``z`` and ``fz`` (``None`` until an evaluation exists).

    Args:
        fn: the map ``f``, or ``None`` when ``fz`` is given.
        z: the point, a floating-point tensor of shape ``(B, ...)``.
        fz: ``f(z)`` computed with a graph from ``z`` (which must require grad), or ``None``.
            Default: ``None``.
        create_graph: keep the products differentiable (e.g. for a Jacobian regulariser that
            is trained through); otherwise they carry no graph. Keyword only. Default: False.

    Raises:
        TypeError: if ``fn`` is not callable, or ``z`` is not a floating-point tensor.
        ValueError: if neither ``fn`` nor ``fz`` is given, if ``fz`` is given but ``z`` does
            not require grad, or if ``fz`` (or ``fn(z)``) is not a tensor of the shape of ``z``.

    Reference: lineax's ``JacobianLinearOperator``; the double-VJP trick as in J. Townsend,
    "A new trick for calculating Jacobian vector products" (2017).

    Example:
        >>> import torch
        >>> from deqkit.linear import IdentityMinus, JacobianOperator
        >>> z = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
        >>> J = JacobianOperator(lambda z: z ** 2, z)  # J = diag(2 z)
        >>> v = torch.ones_like(z)
        >>> J.mv(v).tolist(), J.rmv(v).tolist(), IdentityMinus(J).T.mv(v).tolist()
        ([[0.0, 2.0]], [[0.0, 2.0]], [[1.0, -1.0]])
        >>> z_req = z.clone().requires_grad_(True)
        >>> J = JacobianOperator.from_evaluation(z_req, torch.sin(z_req))  # diag(cos z)
        >>> torch.allclose(J.mv(v), torch.cos(z))
        True
    """

    def __init__(self, fn: MatVec | None, z: Tensor, fz: Tensor | None = None, *,
                 create_graph: bool = False) -> None:
        _check_point(fn, z, fz)
        self.fn, self.z, self.fz = fn, z, fz
        self.create_graph = create_graph
        self._shape = (z.shape[0], z.numel() // z.shape[0])
        self._z_req: Tensor | None = None if fz is None else z
        self._w: Tensor | None = None  # dummy cotangent of the double-VJP trick
        self._jtw: Tensor | None = None  # J^T w, linear in w

    @classmethod
    def from_evaluation(cls, z: Tensor, fz: Tensor, *,
                        create_graph: bool = False) -> JacobianOperator:
        """The Jacobian at ``z`` of an evaluation ``fz = f(z)`` made with a graph."""
        return cls(None, z, fz, create_graph=create_graph)

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self.z.dtype)
    device = property(lambda self: self.z.device)

    def mv(self, v: Tensor) -> Tensor:
        if self.fn is not None:
            _, jv = torch.func.jvp(self.fn, (self.z,), (v.reshape(self.z.shape),))
            return self._out(jv)
        w, jtw = self._double_vjp()
        if not jtw.requires_grad:  # J^T w does not depend on w: J = 0
            return torch.zeros_like(v)
        return self._grad(jtw, w, v)

    def rmv(self, u: Tensor) -> Tensor:
        z_req, fz = self._evaluation()
        if not fz.requires_grad:  # f depends on nothing differentiable: J = 0
            return torch.zeros_like(u)
        return self._grad(fz, z_req, u)

    def _grad(self, out: Tensor, inp: Tensor, cotangent: Tensor) -> Tensor:
        if cotangent.shape != out.shape:
            cotangent = cotangent.reshape(out.shape)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(
                out, inp, cotangent, retain_graph=True,
                create_graph=self.create_graph, allow_unused=True, materialize_grads=True,
            )
        return self._out(g)

    def _out(self, t: Tensor) -> Tensor:
        # (the shape tests and the detach are skipped when not needed: this runs per product)
        if t.shape != self._shape:
            t = t.reshape(self._shape)
        return t.detach() if t.requires_grad and not self.create_graph else t

    def _evaluation(self) -> tuple[Tensor, Tensor]:
        """``(z_req, f(z_req))`` with a graph: the given one, or one evaluation of ``fn``."""
        if self.fz is None:
            assert self.fn is not None  # guaranteed by _check_point
            with torch.enable_grad():
                z = self.z if self.z.requires_grad else self.z.detach().requires_grad_(True)
                self.fz = _checked_output(self.fn(z), z)
            self._z_req = z
        assert self._z_req is not None
        return self._z_req, self.fz

    def _double_vjp(self) -> tuple[Tensor, Tensor]:
        """``(w, J^T w)`` with a graph in a dummy cotangent ``w`` (whose value is irrelevant)."""
        if self._w is None:
            z_req, fz = self._evaluation()
            with torch.enable_grad():
                w = torch.zeros_like(fz, requires_grad=True)
                jtw = z_req.new_zeros(z_req.shape)
                if fz.requires_grad:
                    (jtw,) = torch.autograd.grad(fz, z_req, w, create_graph=True,
                                                 allow_unused=True, materialize_grads=True)
            self._w, self._jtw = w, jtw
        assert self._jtw is not None
        return self._w, self._jtw


def _check_point(fn: MatVec | None, z: object, fz: object) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"JacobianOperator: `fn` must be callable, got {type(fn).__name__}.")
    if not isinstance(z, Tensor) or not z.is_floating_point():
        got = z.dtype if isinstance(z, Tensor) else type(z).__name__
        raise TypeError(f"JacobianOperator: `z` must be a floating-point tensor, got {got}.")
    if z.dim() < 1 or z.numel() == 0:
        raise ValueError(
            "JacobianOperator: `z` must have a batch dimension and at least one element, got "
            f"shape {tuple(z.shape)}. Pass e.g. z of shape (B, D)."
        )
    if fz is None:
        if fn is None:
            raise ValueError(f"JacobianOperator: give `fn` or `fz`, got neither. {_JACOBIAN_HELP}")
        return
    _checked_output(fz, z)
    if not z.requires_grad:
        raise ValueError(
            "JacobianOperator: `fz` was given but `z` does not require grad, so f(z) cannot be "
            "differentiated with respect to it. Compute fz = f(z) from "
            "z.detach().requires_grad_(True) under torch.enable_grad(), or pass `fn` instead."
        )


def _checked_output(fz: object, z: Tensor) -> Tensor:
    if not isinstance(fz, Tensor) or fz.shape != z.shape:
        got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
        raise ValueError(
            f"JacobianOperator: f(z) must be a tensor of the shape of z {tuple(z.shape)}, "
            f"got {got}."
        )
    return fz
