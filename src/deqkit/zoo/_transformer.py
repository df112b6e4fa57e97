"""Language models: the weight-tied DEQ transformer and its explicit baseline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_float, check_int
from ..adjoint.onestep import OneStepAdjoint
from ..nn._deq import DEQ
from ..nn._dropout import VariationalDropout, reset_dropout
from ..solvers.picard import Picard


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention (``scaled_dot_product_attention(is_causal=True)``).

    .. math:: \mathrm{Attn}(h)_t = W_o \big[\mathrm{softmax}\big(q_t K_{\le t}^\top /
        \sqrt{d_h}\big) V_{\le t}\big]_{\text{heads}}

    Position ``t`` attends to positions ``<= t`` only (Vaswani et al. 2017, "Attention Is All
    You Need"; the causal mask of decoder-only language models).

    Args:
        d_model: model width (divisible by ``n_heads``).
        n_heads: attention heads.

    Example:
        >>> import torch
        >>> attn = CausalSelfAttention(16, 2); h = torch.randn(1, 4, 16)
        >>> torch.allclose(attn(h)[:, :2], attn(h[:, :2]), atol=1e-6)  # no look-ahead
        True
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(
                f"CausalSelfAttention: `d_model` ({d_model}) must be divisible by `n_heads` "
                f"({n_heads})."
            )
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(h).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TransformerCell(nn.Module):
    r"""Pre-LayerNorm causal transformer block with input injection and an output LayerNorm.

    .. math::
        h = z + u, \quad h' = h + \mathrm{Attn}(\mathrm{LN}_1 h), \quad
        f(z, u) = \mathrm{LN}_{\text{out}}\big(h' + \mathrm{MLP}(\mathrm{LN}_2 h')\big).

    The output LayerNorm keeps the state bounded and makes the block contractive in :math:`z`
    at initialisation (with a unit-scale injection :math:`u`, the identity path is shrunk by
    :math:`1/\mathrm{std}(z + u) \approx 1/2`). Attention is causal and everything else acts
    per position, so the output at position :math:`t` depends only on positions
    :math:`\le t`, and samples never mix. Dropout is variational (one mask per solve).

    Args:
        d_model: model width.
        n_heads: attention heads.
        d_ff: MLP hidden width.
        dropout: variational dropout probability after attention and MLP. Default: 0.0.

    Reference: the weight-tied transformer cell with input injection of Bai, Kolter, Koltun
    (2019), "Deep Equilibrium Models" (their DEQ-Transformer), with pre-LayerNorm (Xiong et
    al. 2020, "On Layer Normalization in the Transformer Architecture").

    Example:
        >>> import torch
        >>> cell = TransformerCell(16, 2, 32)
        >>> cell(torch.zeros(3, 5, 16), torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 16])
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.ln_out = nn.LayerNorm(d_model)
        self.drop1 = VariationalDropout(dropout)
        self.drop2 = VariationalDropout(dropout)
        for lin in (self.attn.qkv, self.attn.proj, self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, 0.0, 0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        h = z + u
        h = h + self.drop1(self.attn(self.ln1(h)))
        h = h + self.drop2(self.mlp(self.ln2(h)))
        return self.ln_out(h)


class _LanguageModel(nn.Module):
    """Embeddings (token + learned position, LayerNorm-ed) and the LM head."""

    def _init_lm(self, vocab_size: int, d_model: int, n_heads: int, d_ff: int,
                 block_size: int, dropout: float) -> None:
        owner = type(self).__name__
        check_int(owner, "vocab_size", vocab_size)
        check_int(owner, "d_model", d_model)
        check_int(owner, "n_heads", n_heads)
        check_int(owner, "d_ff", d_ff)
        self.block_size = check_int(owner, "block_size", block_size)
        check_float(owner, "dropout", dropout, ge=0, lt=1)
        if d_model % n_heads:
            raise ValueError(
                f"{owner}: `d_model` ({d_model}) must be divisible by `n_heads` ({n_heads})."
            )
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Parameter(torch.zeros(block_size, d_model))
        nn.init.normal_(self.pos_emb, 0.0, 0.02)
        self.ln_in = nn.LayerNorm(d_model)
        self.emb_drop = nn.Dropout(dropout)
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def embed(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{type(self).__name__}: expected integer token ids of shape (B, T), got "
                f"{tuple(idx.shape)} {idx.dtype}."
            )
        T = idx.shape[1]
        if self.block_size < T:
            raise ValueError(
                f"{type(self).__name__}: sequence length {T} exceeds block_size "
                f"{self.block_size}."
            )
        return self.emb_drop(self.ln_in(self.tok_emb(idx) + self.pos_emb[:T]))

    def logits(self, z: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(z))


def default_lm_solver() -> Picard:
    """``dk.Picard(rtol=1e-4, atol=1e-6)``: the forward solver of :class:`DEQTransformerLM`."""
    return Picard(rtol=1e-4, atol=1e-6)


class DEQTransformerLM(_LanguageModel):
    r"""Weight-tied causal transformer language model solved as a deep equilibrium.

    .. math::
        u = \mathrm{LN}(E_{\text{tok}}[x] + E_{\text{pos}}), \qquad
        z^\star = f(z^\star, u), \qquad \text{logits} = W\,\mathrm{LN}(z^\star) + b,

    with :math:`f` the :class:`TransformerCell` (pre-LN causal self-attention and MLP, input
    injection at every application, output LayerNorm). The DEQ state has shape
    ``(B, T, d_model)``; attention mixes positions within a sample, never across samples, so
    per-sample stopping and compaction stay valid (Bai, Kolter, Koltun, "Deep Equilibrium
    Models", NeurIPS 2019).

    Default training recipe (chosen for accuracy per unit of training time; see
    ``benchmarks/bench_lm.py``): a short forward solve, ``max_steps=1`` Picard step from
    zero, then :class:`OneStepAdjoint` (return :math:`f(\hat z, u)`, differentiated through
    that one application, plus the relative fixed-point residual as a penalty with weight 1).
    The penalty keeps the cell contractive (relative residual about 0.1 after the one training
    step), so evaluation, which solves to ``rtol=1e-4`` within ``eval_max_steps``, sees the
    same function the training optimised. Memory of a training step: one graph of the cell.
    The exact implicit gradient (``adjoint=dk.ImplicitAdjoint(...)``) with a long training
    solve is available but slower per step, and on the character LM the cell then loses
    contractivity during training.

    Args:
        vocab_size: vocabulary size :math:`V`.
        d_model: width. Default: 64.
        n_heads: attention heads. Default: 4.
        d_ff: MLP hidden width. Default: 128.
        block_size: maximum sequence length. Default: 64.
        dropout: embedding dropout and variational dropout in the cell. Default: 0.0.
        solver: forward solver. Default: ``dk.Picard(rtol=1e-4, atol=1e-6)``.
        adjoint: gradient. Default: ``OneStepAdjoint(residual_weight=1.0)``.
        max_steps: solver budget in training mode. Default: 1.
        eval_max_steps: solver budget in eval mode. Default: 50.
        **deq_kwargs: further keyword arguments of :class:`deqkit.nn.DEQ`.

    Attributes:
        deq: the :class:`deqkit.nn.DEQ` layer.

    Example:
        >>> import torch
        >>> model = DEQTransformerLM(11, d_model=16, n_heads=2, d_ff=32, block_size=8).eval()
        >>> with torch.no_grad():
        ...     out = model(torch.randint(0, 11, (2, 5)))
        >>> out.shape, model.deq.last_solution.result
        (torch.Size([2, 5, 11]), <RESULTS.successful: 0>)
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        d_ff: int = 128,
        block_size: int = 64,
        dropout: float = 0.0,
        solver: Any = None,
        adjoint: Any = None,
        max_steps: int = 1,
        eval_max_steps: int | None = 50,
        **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        self._init_lm(vocab_size, d_model, n_heads, d_ff, block_size, dropout)
        self.deq = DEQ(
            TransformerCell(d_model, n_heads, d_ff, dropout),
            solver=default_lm_solver() if solver is None else solver,
            adjoint=OneStepAdjoint() if adjoint is None else adjoint,
            max_steps=max_steps,
            eval_max_steps=eval_max_steps,
            **deq_kwargs,
        )

    def forward(self, idx: Tensor) -> Tensor:
        u = self.embed(idx)
        reset_dropout(self.deq.cell)  # one variational mask per solve
        return self.logits(self.deq(u))


class TransformerLM(_LanguageModel):
    r"""Explicit (untied) baseline: ``depth`` :class:`TransformerCell` blocks, own weights.

    .. math:: u = \mathrm{LN}(E_{\text{tok}}[x] + E_{\text{pos}}), \quad z_0 = 0, \quad
        z_{l+1} = f_l(z_l, u), \quad \text{logits} = W\,\mathrm{LN}(z_L) + b.

    Args:
        vocab_size: vocabulary size.
        d_model: width. Default: 64.
        n_heads: attention heads. Default: 4.
        d_ff: MLP hidden width. Default: 128.
        block_size: maximum sequence length. Default: 64.
        depth: number of blocks. Default: 4.
        dropout: dropout probability. Default: 0.0.

    Example:
        >>> import torch
        >>> model = TransformerLM(11, d_model=16, n_heads=2, d_ff=32, block_size=8, depth=2)
        >>> model(torch.randint(0, 11, (2, 5))).shape
        torch.Size([2, 5, 11])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        d_ff: int = 128,
        block_size: int = 64,
        depth: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self._init_lm(vocab_size, d_model, n_heads, d_ff, block_size, dropout)
        self.depth = check_int(type(self).__name__, "depth", depth)
        self.blocks = nn.ModuleList(
            TransformerCell(d_model, n_heads, d_ff, dropout) for _ in range(depth)
        )

    def forward(self, idx: Tensor) -> Tensor:
        u = self.embed(idx)
        reset_dropout(self)
        z = torch.zeros_like(u)
        for block in self.blocks:
            z = block(z, u)
        return self.logits(z)


__all__ = ["CausalSelfAttention", "DEQTransformerLM", "TransformerCell",
           "TransformerLM", "default_lm_solver"]
