"""The engine of the linear probe: a batched, preconditioned L-BFGS for softmax regression.

Minimizes, for each ``C`` of a batch, scikit-learn's ``LogisticRegression`` objective scaled
by ``1/n`` as scikit-learn scales it: ``mean(log_loss) + ||W||^2 / (2 C n)``, intercept
unpenalized. One objective call reads ``X`` once for the whole batch (the weights of every
``C`` side by side in one matmul), so a sweep costs little more than one fit.

* Standardization is folded into the weights (``X`` is never copied or modified).
* The variables are preconditioned by the eigenvectors of the features' covariance, which
  changes the path of L-BFGS, not its minimizer.
* Everything runs in float32 on ``X``'s device; objective values are summed in float64.

Imported lazily by :mod:`backbench.probe.linear`; torch is imported at the top here.
"""

from __future__ import annotations

import numpy as np
import torch

from backbench.errors import ProbeInputError
from backbench.probe.blocks import iter_blocks

BLOCK_ROWS = 4096
MAX_PRECONDITION_DIM = 2048  # above this a d x d eigendecomposition is not worth it
PRECONDITION_ROWS = 16384  # rows sampled to estimate the covariance
FTOL = 1e-9  # relative decrease of f that counts as float32 noise


def _blocks(X, device, block_rows: int = BLOCK_ROWS):
    """``(start, float32 tensor)`` row blocks of a tensor or of a lazy :class:`GroupRows` (streamed)."""
    for start, rows in iter_blocks(X, block_rows, stored_chunks=True):
        yield start, rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows).to(device)


def _device(X):
    return X.device if isinstance(X, torch.Tensor) else torch.device(getattr(X, "device", "cpu"))


def moments(X, weights: torch.Tensor, standardize: bool):
    """Weighted mean and scale of the columns of ``X`` (two blockwise passes); raises on NaN/inf."""
    mean = torch.zeros(X.shape[1], dtype=torch.float64, device=_device(X))
    for i, Xb in _blocks(X, mean.device):
        mean += (weights[i : i + len(Xb)] @ Xb).double()
    if not bool(torch.isfinite(mean).all()):
        raise ProbeInputError("X contains NaN or infinite values; drop or impute them before probing")
    if not standardize:
        return torch.zeros_like(mean), torch.ones_like(mean)
    var = torch.zeros_like(mean)
    m32 = mean.float()
    for i, Xb in _blocks(X, mean.device):
        var += (weights[i : i + len(Xb)] @ (Xb - m32).square_()).double()
    scale = var.sqrt()
    constant = scale <= 1e-6 * torch.clamp(mean.abs(), min=1.0)  # as StandardScaler: leave as is
    return mean, torch.where(constant, torch.ones_like(scale), scale)


class Objective:
    """Weighted mean softmax cross-entropy plus L2 for a batch of ``[W.ravel(), b]`` rows.

    ``W`` (K, d) acts on standardized features; ``weights`` (n,) sum to 1 over the rows
    being fitted and are 0 elsewhere (a holdout inside ``X`` costs no copy).
    """

    def __init__(self, X, codes, weights, mean, scale, n_classes: int) -> None:
        self.X, self.w, self.K = X, weights, n_classes
        self.Kd = n_classes * X.shape[1]
        self.mu = mean.float()
        self.inv_s = 1.0 / scale.float()
        self.yidx = codes.view(-1, 1, 1)

    def effective(self, theta):
        """``(W, W_eff, b_eff)``: the last two act on raw (unstandardized) features."""
        B, d = theta.shape[0], self.X.shape[1]
        W = theta[:, : self.Kd].reshape(B * self.K, d)
        W_eff = W * self.inv_s
        return W, W_eff, theta[:, self.Kd :].reshape(-1) - W_eff @ self.mu

    def __call__(self, theta, lam):
        """``(f (B,) float64, gradient (B, P))`` with L2 strengths ``lam`` (B,).

        An in-memory ``X`` is one block; a streamed one (:class:`GroupRows`) is read chunk by
        chunk, the gradient summed over chunks: the same minimizer, one pass per call.
        """
        B, K = theta.shape[0], self.K
        W, W_eff, b_eff = self.effective(theta)
        f = 0.5 * lam * W.view(B, -1).double().square().sum(1)
        parts = [(0, self.X)] if isinstance(self.X, torch.Tensor) else _blocks(self.X, self.w.device)
        gb = gX = None
        for start, Xb in parts:
            stop = start + len(Xb)
            Z = torch.addmm(b_eff, Xb, W_eff.t())
            Z3 = Z.view(len(Xb), B, K)
            idx = self.yidx[start:stop].expand(len(Xb), B, 1)
            zy = Z3.gather(2, idx)
            m = Z3.amax(2, keepdim=True)
            Z3.sub_(m).exp_()
            s = Z3.sum(2, keepdim=True)
            rows = (s.log() + m - zy).squeeze(2)
            w = self.w[start:stop]
            f = f + w.double() @ rows.double()
            Z3.div_(s).scatter_add_(2, idx, torch.full_like(zy, -1.0))  # softmax - onehot
            Z.mul_(w[:, None])
            part_b, part_X = Z.sum(0), torch.mm(Z.t(), Xb)  # Z.t() @ X: the fast kernel
            gb, gX = (part_b, part_X) if gb is None else (gb + part_b, gX + part_X)
        gW = (gX - gb[:, None] * self.mu) * self.inv_s
        gW = gW.view(B, -1) + lam.float()[:, None] * W.view(B, -1)
        return f, torch.cat([gW, gb.view(B, K)], 1)


class Batch:
    """One problem per ``C`` over a shared objective, optionally preconditioned.

    With ``V`` (eigenvectors of the standardized covariance) the optimizer's variables are
    ``A`` with ``W = (A * h) @ V.T``, where ``h`` (one row per problem) is the inverse square
    root of the expected Hessian along each eigenvector: correlated features then take far
    fewer L-BFGS steps, and the minimizer is the same.
    """

    def __init__(self, obj: Objective, lam, V=None, h=None) -> None:
        self.obj, self.lam, self.V, self.h = obj, lam, V, h

    def _map(self, theta, idx, to_weights: bool):
        if self.V is None:
            return theta
        B, K, Kd = len(theta), self.obj.K, self.obj.Kd
        h = self.h[idx, None, :]
        A = theta[:, :Kd].reshape(B * K, -1)
        W = ((A.view(B, K, -1) * h).view(B * K, -1) @ self.V.t()) if to_weights else (A @ self.V).view(B, K, -1) / h
        return torch.cat([W.reshape(B, Kd), theta[:, Kd:]], 1)

    def to_weights(self, theta, idx):
        return self._map(theta, idx, True)

    def from_weights(self, theta, idx):
        return self._map(theta, idx, False)

    def __call__(self, theta, idx):
        """``(f, gradient in the optimizer's variables, max-abs gradient in W)`` for problems ``idx``."""
        f, g = self.obj(self.to_weights(theta, idx), self.lam[idx])
        gmax = g.abs().amax(1)
        if self.V is not None:
            B, K, Kd = len(theta), self.obj.K, self.obj.Kd
            gA = (g[:, :Kd].reshape(B * K, -1) @ self.V).view(B, K, -1) * self.h[idx, None, :]
            g = torch.cat([gA.reshape(B, Kd), g[:, Kd:]], 1)
        return f, g, gmax


def preconditioner(X, weights, mean, scale):
    """``(evals, V)`` of the standardized covariance of a row sample, or ``None`` if ``d`` is too wide."""
    if X.shape[1] > MAX_PRECONDITION_DIM:
        return None
    fit = (weights > 0).nonzero().squeeze(1)
    rows = fit[:: max(1, len(fit) // PRECONDITION_ROWS)]
    mu, inv_s = mean.float(), 1.0 / scale.float()
    cov = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=_device(X))
    for i in range(0, len(rows), BLOCK_ROWS):
        take = rows[i : i + BLOCK_ROWS]
        Xb = X[take] if isinstance(X, torch.Tensor) else torch.from_numpy(X[take.cpu().numpy()]).to(cov.device)
        Xb = (Xb - mu) * inv_s
        cov += (Xb.t() @ Xb).double()
    evals, V = torch.linalg.eigh(cov / len(rows))
    return evals.clamp(min=0).float(), V.float()


def _scales(evals, lam, curvature: float, floor: float = 1e-3):
    """Rows ``h = (evals + lam / curvature)^(-1/2)``: the expected Hessian's shape per problem."""
    shift = torch.clamp(lam.float()[:, None] / curvature, min=floor * float(evals.mean()))
    return torch.rsqrt(evals[None, :] + shift)


def _two_loop(g, S, Y, rho, gamma, k: int, history: int):
    """L-BFGS direction ``-H g`` for a batch; pairs with ``rho == 0`` are skipped."""
    q = -g
    slots = [(k - 1 - j) % history for j in range(min(k, history))]
    alphas = []
    for i in slots:
        a = rho[i] * (S[i] * q).sum(1)
        q = q - a[:, None] * Y[i]
        alphas.append(a)
    r = q * gamma[:, None]
    for i, a in zip(reversed(slots), reversed(alphas)):
        r = r + (a - rho[i] * (Y[i] * r).sum(1))[:, None] * S[i]
    return r


def _line_search(fun, idx, theta, f, g, d, t, max_ls: int = 12):
    """Batched backtracking line search: ``(theta, f, g, gmax, accepted)``.

    A step is accepted by Armijo's condition or, where float32 rounding hides the decrease
    of ``f``, by Hager and Zhang's approximate Wolfe conditions (they use the slope).
    """
    gtd = (g * d).sum(1).double()
    new_theta, new_f, new_g = theta.clone(), f.clone(), g.clone()
    new_gmax = torch.full_like(t, float("inf"))
    ok = torch.zeros(len(theta), dtype=torch.bool, device=theta.device)
    t = t.double()
    for _ in range(max_ls):
        todo = (~ok).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        trial = theta[todo] + t[todo, None].float() * d[todo]
        f_try, g_try, gmax = fun(trial, idx[todo])
        slope, g0 = (g_try * d[todo]).sum(1).double(), gtd[todo]
        near = (f_try <= f[todo] + 1e-6 * f[todo].abs()) & (slope >= 0.9 * g0) & (slope <= -0.8 * g0)
        good = (f_try <= f[todo] + 1e-4 * t[todo] * g0) | near
        acc = todo[good]
        new_theta[acc], new_f[acc], new_g[acc], new_gmax[acc] = trial[good], f_try[good], g_try[good], gmax[good]
        ok[acc] = True
        bad = todo[~good]  # quadratic interpolation, kept within [0.1, 0.5] of the last step
        tb, curve = t[bad], 2 * (f_try[~good] - f[bad] - gtd[bad] * t[bad])
        t_new = -gtd[bad] * tb * tb / torch.clamp(curve, min=1e-300)
        t[bad] = torch.minimum(torch.maximum(t_new, 0.1 * tb), 0.5 * tb)
    return new_theta, new_f, new_g, new_gmax, ok


def _pair_weights(s, y):
    """``(rho, gamma)`` of L-BFGS pairs; pairs without positive curvature get ``rho = 0``."""
    sy, yy = (s * y).sum(-1), (y * y).sum(-1)
    good = sy > 1e-10 * yy.sqrt() * s.norm(dim=-1)
    return torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0), good, sy / torch.where(good, yy, 1.0)


def lbfgs(fun, theta, *, max_iter: int, tol: float, history: int = 10):
    """Minimize each row of ``theta`` independently with ``fun(theta, idx)``, sharing its calls.

    A row stops when its max-abs gradient in ``W`` is at most ``tol`` (scikit-learn's
    ``gtol``), when its actual or predicted relative decrease falls to float32 noise
    (``FTOL``), when no step decreases it, or at ``max_iter``. Returns ``(theta, n_iter)``.
    """
    B, P = theta.shape
    dev = theta.device
    f, g, gmax = fun(theta, torch.arange(B, device=dev))
    S, Y = torch.zeros(history, B, P, device=dev), torch.zeros(history, B, P, device=dev)
    rho, gamma = torch.zeros(history, B, device=dev), torch.ones(B, device=dev)
    k = 0
    n_iter = torch.zeros(B, dtype=torch.long)
    active = ((gmax > tol).cpu()) & (n_iter < max_iter)
    while bool(active.any()):
        idx = active.nonzero().squeeze(1).to(dev)
        th, fa, ga = theta[idx], f[idx], g[idx]
        d = _two_loop(ga, S[:, idx], Y[:, idx], rho[:, idx], gamma[idx], k, history)
        flat = (-(ga * d).sum(1).double() <= FTOL * torch.clamp(fa.abs(), min=1.0)).cpu()
        if bool(flat.any()):  # the predicted decrease is below float32 noise: converged
            active[idx.cpu()[flat]] = False
            continue
        t = torch.clamp(1.0 / ga.norm(dim=1), max=1.0) if k == 0 else torch.ones(len(idx), device=dev)
        th2, f2, g2, gmax, ok = _line_search(fun, idx, th, fa, ga, d, t)
        s, y = th2 - th, g2 - ga
        r, good, gam = _pair_weights(s, y)
        S[k % history, idx], Y[k % history, idx] = s, y
        rho[k % history, idx] = torch.where(ok, r, 0.0)
        gamma[idx] = torch.where(ok & good, gam, gamma[idx])
        theta[idx], f[idx], g[idx] = th2, f2, g2
        k += 1
        n_iter[idx.cpu()] += 1
        small = (fa - f2) <= FTOL * torch.clamp(f2.abs(), min=1.0)
        done = ((~ok) | small | (gmax <= tol)).cpu()
        active[idx.cpu()[done]] = False
        active &= n_iter < max_iter
    return theta, n_iter


def solve(obj: Objective, Cs, n_fit: int, theta0, *, max_iter: int, tol: float, eig=None):
    """Fit one problem per ``C`` from ``[W.ravel(), b]`` rows ``theta0``: ``(theta, n_iter)``.

    Two classes use ``C/2``: the multinomial problem then equals scikit-learn's binary one.
    """
    factor = 2.0 if obj.K == 2 else 1.0
    lam = torch.tensor([factor / (C * n_fit) for C in Cs], dtype=torch.float64, device=theta0.device)
    V = h = None
    if eig is not None:
        V, h = eig[1], _scales(eig[0], lam, curvature=min(0.25, 1.0 / obj.K))
    fun = Batch(obj, lam, V, h)
    idx = torch.arange(len(Cs), device=theta0.device)
    theta, n_iter = lbfgs(fun, fun.from_weights(theta0, idx), max_iter=max_iter, tol=tol)
    return fun.to_weights(theta, idx), n_iter


def initial(codes, weights, n_classes: int, d: int):
    """Zero weights with centered log-prior intercepts: a better start than all zeros."""
    prior = torch.zeros(n_classes, dtype=torch.float64, device=weights.device)
    prior.index_add_(0, codes, weights.double())
    logp = torch.log(torch.clamp(prior, min=1e-12))
    theta = torch.zeros(1, n_classes * d + n_classes, device=weights.device)
    theta[0, n_classes * d :] = (logp - logp.mean()).float()
    return theta


def extrapolate(thetas: list, Cs_done: list[float], Cs_next: list[float]):
    """Warm starts for ``Cs_next``: linear in ``log C`` from the last two solutions, at most one step."""
    if len(thetas) < 2:
        return thetas[-1][None].expand(len(Cs_next), -1).clone()
    last, prev = thetas[-1], thetas[-2]
    step = np.log(Cs_done[-1]) - np.log(Cs_done[-2])
    return torch.stack([last + min(1.0, (np.log(C) - np.log(Cs_done[-1])) / step) * (last - prev) for C in Cs_next])
