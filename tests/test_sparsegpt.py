"""SparseGPT against a plain OBS loop: one column at a time, with the explicit inverse Hessian of the
weights still free, downdated by a rank-one update after every column (and checked against
torch.linalg.inv of the remaining block of H at each step)."""

from __future__ import annotations

import pytest
import torch

from shears.sparsegpt import InputHessian, sparsegpt_prune


def reference_obs(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm, blocksize: int, percdamp: float):
    """The OBS pruning SparseGPT computes, written the slow, obvious way in float64."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    rows, cols = W.shape
    Hinv = torch.linalg.inv(H)  # inverse Hessian of columns c.. (all of them at c = 0)
    prune = torch.zeros(rows, cols, dtype=torch.bool)

    def lowest(saliency: torch.Tensor, count: int) -> torch.Tensor:
        chosen = torch.zeros_like(saliency, dtype=torch.bool)
        for r in range(saliency.shape[0]):
            for j in sorted(range(saliency.shape[1]), key=lambda j: (float(saliency[r, j]), j))[:count]:
                chosen[r, j] = True
        return chosen

    def obs_error_diag(j: int) -> float:  # [H^-1]_jj once columns < j are frozen
        return float(torch.linalg.inv(H[j:, j:])[0, 0])

    for c in range(cols):
        torch.testing.assert_close(Hinv, torch.linalg.inv(H[c:, c:]), rtol=1e-8, atol=1e-10)
        if nm is None and c % blocksize == 0:
            end = min(c + blocksize, cols)
            diag = torch.tensor([obs_error_diag(j) for j in range(c, end)], dtype=W.dtype)
            count = int(end * sparsity) - int(c * sparsity)
            prune[:, c:end] = lowest(W[:, c:end] ** 2 / diag, count)
        if nm is not None and c % nm[1] == 0:
            diag = torch.tensor([obs_error_diag(j) for j in range(c, c + nm[1])], dtype=W.dtype)
            prune[:, c:c + nm[1]] = lowest(W[:, c:c + nm[1]] ** 2 / diag, nm[0])
        w = W[:, c].clone()
        q = torch.where(prune[:, c], torch.zeros_like(w), w)
        W[:, c:] -= ((w - q) / Hinv[0, 0]).unsqueeze(1) * Hinv[0, :].unsqueeze(0)  # the OBS update
        W[:, c] = q
        Hinv = (Hinv - Hinv[:, :1] @ Hinv[:1, :] / Hinv[0, 0])[1:, 1:]  # column c leaves the problem
    return W, ~prune


def calibration(tokens: int, columns: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, columns, generator=g) * torch.linspace(0.2, 3.0, columns)  # uneven channel scales
    X[:, list(dead)] = 0
    return X


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    layer = torch.nn.Linear(X.shape[1], 1, bias=False)
    hook = InputHessian(layer)
    for part in X.split(7):  # accumulated over batches, as the calibration pass calls it
        hook(layer, (part[None],), None)
    torch.testing.assert_close(hook.hessian(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-5)
    return hook.hessian()


@pytest.mark.parametrize("sparsity,nm,blocksize", [(0.5, None, 8), (0.4, None, 16), (0.3, None, 32),
                                                   (0.5, (2, 4), 8), (0.5, (4, 8), 16)])
def test_sparsegpt_equals_the_column_by_column_obs_loop(sparsity, nm, blocksize):
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    H = hessian_of(calibration(200, 32, seed=2))
    got, keep = sparsegpt_prune(W, H, sparsity, nm, blocksize=blocksize, percdamp=0.01)
    want, want_keep = reference_obs(W, H, sparsity, nm, blocksize, 0.01)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got == 0, ~keep | (W == 0))
    if nm is None:
        assert ((~keep).sum(dim=1) == int(32 * sparsity)).all()  # every row loses exactly its share
    else:
        assert ((~keep).reshape(6, -1, nm[1]).sum(-1) == nm[0]).all()


def test_a_singular_hessian_is_damped_never_nan_and_still_matches_the_reference():
    """Dead input channels (H_cc = 0) and fewer calibration tokens than inputs (rank-deficient H)."""
    W = torch.randn(5, 24, generator=torch.Generator().manual_seed(3))
    X = calibration(10, 24, seed=4, dead=(0, 5, 23))
    H = hessian_of(X)
    assert torch.linalg.matrix_rank(H) < 24
    got, keep = sparsegpt_prune(W, H, 0.5, blocksize=8)
    assert torch.isfinite(got).all()
    want, want_keep = reference_obs(W, H, 0.5, None, 8, 0.01)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert (got[:, [0, 5, 23]] == 0).all()  # weights of channels that never fire are zeroed, as in the paper
    zero = torch.zeros(24, 24)
    assert torch.isfinite(sparsegpt_prune(W, zero, 0.5)[0]).all()  # no calibration signal at all


def test_reconstruction_lowers_the_layer_error_of_its_own_mask():
    """The OBS updates are the point: the kept weights moved, the output on the calibration inputs is
    closer to the dense one than with the same mask and unchanged weights."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(16, 64, generator=g)
    X = calibration(256, 64, seed=6) @ torch.randn(64, 64, generator=g)  # correlated inputs, as activations are
    got, keep = sparsegpt_prune(W, hessian_of(X), 0.5)
    error = lambda V: float(((W - V) @ X.T).pow(2).sum())  # noqa: E731
    assert error(got) < 0.7 * error(W * keep)


# --------------------------------------------------------------------------- block-sequential, in a model

def test_sequential_sparsegpt_equals_the_reference_on_each_blocks_pruned_inputs():
    """wanda_prune(method="sparsegpt") against: per block, the whole (already partly pruned) model run on
    the calibration to get each linear's H, then `reference_obs` on it -- none of the capture machinery."""
    import copy

    from conftest import make_tiny_model

    from shears.sparsity import wanda_prune

    model = make_tiny_model("llama", seed=0)
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    for i, block in enumerate(reference.model.layers):
        linears = {f"model.layers.{i}.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        inputs = {name: [] for name in linears}
        handles = [m.register_forward_hook(lambda mod, a, out, name=name: inputs[name].append(a[0].reshape(-1, mod.in_features)))
                   for name, m in linears.items()]
        with torch.no_grad():
            reference(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        for name, linear in linears.items():
            X = torch.cat(inputs[name]).double()
            W, keep = reference_obs(linear.weight.detach(), 2 * X.T @ X / X.shape[0], 0.5, (2, 4), 128, 0.01)
            linear.weight.data = W.float()
    masks = wanda_prune(model, ids, sparsity=0.5, pattern="2:4", method="sparsegpt", batch_size=2)
    for name, keep in masks.items():
        want = reference.get_submodule(name).weight
        assert torch.equal(keep, want != 0), name
        torch.testing.assert_close(model.get_submodule(name).weight, want, rtol=1e-3, atol=1e-4)
