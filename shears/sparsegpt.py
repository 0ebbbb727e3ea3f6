"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer and reconstruct the weights it keeps.

Wanda only chooses which weights to drop. SparseGPT also updates the weights that stay, so that the
layer's output on the calibration inputs X moves as little as possible: for the layer-wise problem
min ||W X - W' X||^2 the Hessian of every output row is the same, H = 2 X X^T, and the Optimal Brain
Surgeon (OBS) update for zeroing weight w_c of a row, given the inverse Hessian H^-1 of the weights
still free to move, is

    delta = -(w_c / [H^-1]_cc) * H^-1[c, :]          (error of column c spread over the others)

SparseGPT processes the columns left to right: once column c is handled (pruned or kept), it is frozen
and removed from the problem, so the next column needs the inverse Hessian of columns c..end, which is
inv(H[c:, c:]). All of those rows are, up to a factor, the rows of the upper Cholesky factor U of H^-1
(U[c, c:] = H_c^-1[0, :] / sqrt(H_c^-1[0, 0])), so one Cholesky replaces every rank-one update of
the inverse. Columns are handled in lazy batches of `blocksize`: updates inside a block are applied at
once per column, and the block's accumulated error reaches the later columns in one matmul.

Mask selection, as the paper's adaptive rule: the saliency of weight (r, c) is w_rc^2 / [U_cc]^2, the
OBS error of removing it. Unstructured: at each block start, every row prunes its lowest-saliency
weights of that block -- int(end * sparsity) - int(start * sparsity) of them, so each row loses exactly
int(in_features * sparsity) weights overall, as Wanda's rows do. N:M: at the start of each group of M
columns, every row prunes the N lowest-saliency weights of the group (on the weights updated so far).

A singular Hessian (dead input channels, fewer calibration tokens than inputs) is handled as the
paper does: a channel that never fires gets H_cc = 1 and its weights are zeroed (they multiply zero);
then `percdamp` times the mean diagonal is added to the diagonal, which makes H positive definite.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ShearsError

BLOCKSIZE = 128  # the paper's lazy-batch and adaptive-mask block
PERCDAMP = 0.01  # the paper's dampening: 1% of the average diagonal of H


class InputHessian:
    """Forward hook on an nn.Linear: H = 2 X X^T / tokens over every calibration token, in float32.
    (A constant factor does not change SparseGPT's result: the damping is relative to mean(diag H).)"""

    def __init__(self, linear: nn.Linear):
        n = linear.in_features
        self.sum = torch.zeros(n, n, dtype=torch.float32, device=linear.weight.device)
        self.tokens = 0

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, module.in_features).float()
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum * (2 / max(self.tokens, 1))


def damped_hessian(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """H with dead channels set to 1 (their weights zeroed in `weight`, in place) and the paper's damping."""
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    weight[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return H


def _upper_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U, upper triangular, with U^T U = H^-1."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        inverse = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0 or not torch.isfinite(L).all():
        raise ShearsError(f"SparseGPT: the damped Hessian is not positive definite at percdamp={percdamp}: "
                          "raise the dampening or add calibration samples")
    return U


def _prune_counts(start: int, end: int, sparsity: float) -> int:
    return int(end * sparsity) - int(start * sparsity)


def _lowest(saliency: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` lowest entries of each row (ties to the lower index)."""
    prune = torch.zeros_like(saliency, dtype=torch.bool)
    if count:
        prune.scatter_(1, saliency.argsort(dim=1, stable=True)[:, :count], True)
    return prune


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pruned and reconstructed weight, in float32; keep mask, True = kept) of one [out, in] weight
    with the input Hessian `hessian` ([in, in]). `nm`: (N, M) prunes N of every M consecutive inputs."""
    W = weight.detach().float().clone()
    columns = W.shape[1]
    H = damped_hessian(hessian.float().to(W.device), W, percdamp)
    U = _upper_inverse_cholesky(H, percdamp)
    prune = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        errors = torch.zeros_like(W1)
        d = torch.diag(U1)
        if nm is None:
            prune[:, start:end] = _lowest(W1.pow(2) / d.pow(2), _prune_counts(start, end, sparsity))
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                prune[:, start + i:start + i + nm[1]] = _lowest(W1[:, group].pow(2) / d[group].pow(2), nm[0])
            w = W1[:, i]
            q = torch.where(prune[:, start + i], torch.zeros_like(w), w)
            error = (w - q) / d[i]
            W1[:, i:] -= error.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exactly q: the update above leaves it there up to rounding
            errors[:, i] = error
        W[:, start:end] = W1
        W[:, end:] -= errors @ U[start:end, end:]
    return W, ~prune
