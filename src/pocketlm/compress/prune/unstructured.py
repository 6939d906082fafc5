"""Tensor math of unstructured and N:M pruning: magnitude, Wanda and SparseGPT.

Pure functions on one ``nn.Linear`` weight of shape (out_features, in_features); the caller walks
the model and feeds them layer by layer. Masks are boolean with True = keep.

- Magnitude: drop the smallest |W|.
- Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, compared within each output row.
- SparseGPT (Frantar & Alistarh 2023): OBS pruning with the calibration Hessian H = 2XᵀX/N, one
  column at a time, in column blocks with lazy batch updates, the mask chosen per block from
  w²/[H⁻¹]_jj², using the upper Cholesky factor of H⁻¹.
"""

from __future__ import annotations

import torch
from torch import Tensor

NM = tuple[int, int]


def _check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def _check_nm(n: int, m: int, in_features: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M pruning needs 0 < n < m, got {n}:{m}")
    if in_features % m:
        raise ValueError(f"N:M pruning with m={m} needs in_features divisible by {m}, got {in_features}")


class InputStats:
    """Accumulates what the pruning methods need from a linear layer's inputs.

    Args:
        in_features: width of the layer's input.
        hessian: also accumulate XᵀX (needed by SparseGPT; costs in_features² floats).
    """

    def __init__(self, in_features: int, hessian: bool):
        self.in_features = in_features
        # With the Hessian, the squared column norms are its diagonal and need no accumulator.
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float32) if hessian else None
        self._sumsq = None if hessian else torch.zeros(in_features, dtype=torch.float32)  # (in,)
        self.n_rows = 0

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs of shape (..., in_features); every leading position is one row."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(device="cpu", dtype=torch.float32)  # (N, in)
        if self._xtx is not None:
            self._xtx.addmm_(x.T, x)  # in place: no (in, in) temporary per batch
        else:
            self._sumsq += x.square().sum(0)
        self.n_rows += x.shape[0]

    def _require_data(self) -> None:
        if self.n_rows == 0:
            raise ValueError("InputStats is empty: call add() with calibration inputs first")

    @property
    def col_norm(self) -> Tensor:
        """‖X_j‖₂ per input column, shape (in,) float32."""
        self._require_data()
        return (self._xtx.diagonal() if self._xtx is not None else self._sumsq).sqrt()

    @property
    def hessian_matrix(self) -> Tensor:
        """2·XᵀX/N, shape (in, in) float32."""
        self._require_data()
        if self._xtx is None:
            raise ValueError("InputStats was created with hessian=False; create it with hessian=True")
        return self._xtx * (2.0 / self.n_rows)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns of each row.

    Args:
        scores: (out, in) importance scores.
        n, m: keep n of every m (e.g. 2, 4).
    Returns: bool mask (out, in), True = keep.
    """
    out_f, in_f = scores.shape
    _check_nm(n, m, in_f)
    groups = scores.float().reshape(out_f, in_f // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def global_keep_masks(scores: list[Tensor], sparsity: float) -> list[Tensor]:
    """One threshold across all score tensors so exactly ``round(sparsity·total)`` entries go.

    Ties at the threshold are removed in order of position in the concatenation, so the count is
    exact and the result deterministic.

    Args:
        scores: score tensors of any shapes (higher = more important).
        sparsity: fraction of all entries to remove, in [0, 1).
    Returns: bool masks shaped like ``scores``, True = keep.
    """
    _check_sparsity(sparsity)
    if not scores:
        raise ValueError("global_keep_masks needs at least one score tensor")
    flat = torch.cat([s.detach().float().flatten().cpu() for s in scores])
    k = round(sparsity * flat.numel())
    if k == 0:
        remove = torch.zeros_like(flat, dtype=torch.bool)
    else:
        thresh = flat.kthvalue(k).values
        below = flat < thresh
        ties = flat == thresh
        # Take just enough of the tied entries (first ones) to reach exactly k.
        remove = below | (ties & (ties.cumsum(0) <= k - int(below.sum())))
    keeps = (~remove).split([s.numel() for s in scores])
    return [kp.reshape(s.shape).to(s.device) for kp, s in zip(keeps, scores)]


def magnitude_mask(weight: Tensor, sparsity: float, nm: NM | None = None) -> Tensor:
    """Magnitude pruning mask.

    Args:
        weight: (out, in).
        sparsity: remove the ``round(sparsity·numel)`` smallest |W| over the whole matrix.
        nm: (n, m) for an N:M mask of |W| instead; sparsity is then ignored. Default None.
    Returns: bool mask (out, in), True = keep.
    """
    _check_sparsity(sparsity)
    scores = weight.detach().float().abs()
    if nm is not None:
        return nm_mask(scores, *nm)
    return global_keep_masks([scores], sparsity)[0]


def wanda_mask(weight: Tensor, col_norm: Tensor, sparsity: float, nm: NM | None = None) -> Tensor:
    """Wanda mask: score |W_ij|·‖X_j‖₂, compared within each output row.

    Args:
        weight: (out, in).
        col_norm: (in,) input column norms, e.g. ``InputStats.col_norm``.
        sparsity: each row loses exactly ``int(in·sparsity)`` lowest scores.
        nm: (n, m) for an N:M mask of the scores instead; sparsity is then ignored. Default None.
    Returns: bool mask (out, in), True = keep.
    """
    _check_sparsity(sparsity)
    out_f, in_f = weight.shape
    if col_norm.shape != (in_f,):
        raise ValueError(f"col_norm has shape {tuple(col_norm.shape)}, expected ({in_f},)")
    scores = weight.detach().float().abs() * col_norm.to(weight.device, torch.float32)[None, :]
    if nm is not None:
        return nm_mask(scores, *nm)
    k = int(in_f * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], False)
    return keep


def sparsegpt_prune_(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    nm: NM | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tensor:
    """SparseGPT: prune ``weight`` in place, updating the kept weights to compensate (OBS).

    Args:
        weight: (out, in), any float dtype; computed in float32, written back in its dtype.
        hessian: (in, in) calibration Hessian 2XᵀX/N, e.g. ``InputStats.hessian_matrix``.
        sparsity: fraction of the matrix to remove (exactly, block by block; rows may differ), in [0, 1).
        nm: (n, m) for N:M sparsity instead; sparsity is then ignored. Default None.
        blocksize: columns per lazy-update block (default 128); a multiple of m with ``nm``.
        percdamp: dampening, as a fraction of mean(diag H), added to H's diagonal (default 0.01).
    Returns: bool mask (out, in), True = keep; pruned entries of ``weight`` are exactly 0.
    """
    _check_sparsity(sparsity)
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({in_f}, {in_f})")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if nm is not None:
        _check_nm(nm[0], nm[1], in_f)
        if blocksize % nm[1]:
            raise ValueError(
                f"blocksize {blocksize} must be a multiple of m={nm[1]} so N:M groups stay inside a block"
            )

    W = weight.detach().to(torch.float32).clone()  # (out, in)
    H = hessian.detach().to(W.device, torch.float32).clone()  # (in, in); never touch the caller's
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # inputs that were always zero: their weights cannot matter, drop them
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())

    # Upper Cholesky factor of H⁻¹: row i of it holds the OBS update for eliminating column i
    # after columns < i are already fixed, so one pass left to right needs no re-inversion.
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info != 0:
        raise ValueError(
            f"SparseGPT: the Hessian is not positive definite after dampening with percdamp={percdamp}; "
            "raise percdamp (e.g. 0.1) or use more calibration data"
        )

    prune = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        d2 = Hinv1.diagonal().square()[None, :]  # (1, b)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            # As the reference: the lowest w²/d² over the whole block, so rows may differ in
            # sparsity (the matrix still loses exactly its share, block by block).
            k = int(i2 * sparsity * out_f) - int(i1 * sparsity * out_f)
            mask1.view(-1)[(W1.square() / d2).flatten().argsort(stable=True)[:k]] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # Choose the group's mask from the weights as updated so far.
                g = W1[:, i : i + nm[1]].square() / d2[:, i : i + nm[1]]
                mask1[:, i : i + nm[1]] = ~nm_mask(g, nm[0], nm[1])
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update of the rest of the block
            W1[:, i] = q  # exact zero (the update above leaves rounding residue)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        prune[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns

    weight.data.copy_(W.to(weight.dtype))
    return ~prune
