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

from dataclasses import dataclass

import numpy as np
import torch

from backbench.errors import ProbeInputError
from backbench.probe.blocks import iter_blocks

BLOCK_ROWS = 4096
MAX_PRECONDITION_DIM = 2048  # above this a d x d eigendecomposition is not worth it
PRECONDITION_ROWS = 16384  # rows sampled to estimate the covariance
FTOL = 1e-9  # relative decrease of f that counts as float32 noise
HISTORY = 10  # L-BFGS curvature pairs kept per problem


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
    """One problem per ``C`` over a shared objective, each with its preconditioner.

    L-BFGS runs on the weights themselves; its initial inverse Hessian is ``P = V diag(h^2)
    V^T`` on each class's weights (identity on the intercepts), where ``V`` holds the
    eigenvectors of the standardized covariance and ``h`` (one row per problem) is the inverse
    square root of the expected Hessian along each of them: correlated features then take far
    fewer steps, and the minimizer is the same. Curvature pairs stay in weight space, so they
    stay valid when ``C`` changes (shifted by the change of the L2 term).
    """

    def __init__(self, obj: Objective, lam, V=None, h=None) -> None:
        self.obj, self.lam, self.V = obj, lam, V
        self.h2 = None if h is None else h.square()

    def __call__(self, theta, idx):
        """``(f, gradient, max-abs gradient)`` for problems ``idx``."""
        f, g = self.obj(theta, self.lam[idx])
        return f, g, g.abs().amax(1)

    def precondition(self, q, idx):
        """``P q`` for problems ``idx``: two ``(K, d) x (d, d)`` matmuls per problem."""
        if self.V is None:
            return q
        B, K, Kd = len(q), self.obj.K, self.obj.Kd
        Q = (q[:, :Kd].reshape(B * K, -1) @ self.V).view(B, K, -1) * self.h2[idx, None, :]
        return torch.cat([(Q.view(B * K, -1) @ self.V.t()).reshape(B, Kd), q[:, Kd:]], 1)


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
    evals, V = torch.linalg.eigh((cov / len(rows)).float())  # float32: half the time, as good a preconditioner
    return evals.clamp(min=0), V


def _scales(evals, lam, curvature: float, floor: float = 1e-3):
    """Rows ``h = (evals + lam / curvature)^(-1/2)``: the expected Hessian's shape per problem."""
    shift = torch.clamp(lam.float()[:, None] / curvature, min=floor * float(evals.mean()))
    return torch.rsqrt(evals[None, :] + shift)


def _two_loop(g, S, Y, rho, gamma, k: int, precondition):
    """L-BFGS direction ``-H g`` for a batch, ``H0 = gamma P``; pairs with ``rho == 0`` are skipped."""
    history = len(S)
    q = -g
    slots = [(k - 1 - j) % history for j in range(min(k, history))]
    alphas = []
    for i in slots:
        a = rho[i] * (S[i] * q).sum(1)
        q = q - a[:, None] * Y[i]
        alphas.append(a)
    r = precondition(q) * gamma[:, None]
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


def _curvature(s, y):
    """``(rho, valid)`` of L-BFGS pairs (any leading shape); pairs without positive curvature get ``rho = 0``."""
    sy = (s * y).sum(-1)
    good = sy > 1e-10 * y.norm(dim=-1) * s.norm(dim=-1)
    return torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0), good


@dataclass
class State:
    """L-BFGS state of a batch of problems (rows): the point, ``f`` and gradient there (``None``
    until evaluated), curvature pairs ``S``, ``Y`` (history, rows, P) in weight space, their
    ``rho``, the scale ``gamma`` of ``H0`` and ``k``, the ring buffer's next slot."""

    theta: torch.Tensor
    f: torch.Tensor | None
    g: torch.Tensor | None
    S: torch.Tensor
    Y: torch.Tensor
    rho: torch.Tensor
    gamma: torch.Tensor
    k: int = 0

    @classmethod
    def fresh(cls, theta, history: int = HISTORY) -> State:
        B, P = theta.shape
        zeros = theta.new_zeros(history, B, P)
        return cls(theta, None, None, zeros, zeros.clone(), theta.new_zeros(history, B), theta.new_ones(B))

    def restart(self, j: int, lam_old: float, lam_new, Kd: int, same_objective: bool, pairs: bool = True) -> State:
        """Problem ``j``'s state as the start of one problem per L2 strength in ``lam_new``.

        With ``pairs``, their ``y`` shift by the change of the L2 term's gradient,
        ``(lam_new - lam_old) s`` (a refit on more rows at the same ``C``: 10 instead of 14
        steps at 100 classes); along the path, where ``lam`` changes 4.6-fold, they mislead
        more than they help (63 steps instead of 56), so it drops them. With the same data
        term, ``f`` and the gradient shift exactly (no pass over ``X``).
        """
        B = len(lam_new)
        dl = (lam_new - lam_old).float()
        theta = self.theta[j].expand(B, -1).clone()
        S = self.S[:, j : j + 1].expand(-1, B, -1).clone()
        Y = self.Y[:, j : j + 1].expand(-1, B, -1).clone()
        Y[:, :, :Kd] += dl[None, :, None] * S[:, :, :Kd]
        rho, good = _curvature(S, Y)
        rho = torch.where(good & (self.rho[:, j : j + 1] > 0) & pairs, rho, 0.0)
        f = g = None
        if same_objective:
            W = theta[:, :Kd]
            f = self.f[j] + 0.5 * dl.double() * W.double().square().sum(1)
            g = self.g[j].expand(B, -1).clone()
            g[:, :Kd] += dl[:, None] * W
        gamma = self.gamma[j].expand(B).clone() if pairs else torch.ones_like(dl)
        return State(theta, f, g, S, Y, rho, gamma, self.k)


def lbfgs(fun: Batch, state: State, *, max_iter: int, tol: float, first=None):
    """Minimize each row of ``state`` independently with ``fun(theta, idx)``, sharing its calls.

    A row stops when its max-abs gradient in ``W`` is at most ``tol`` (scikit-learn's
    ``gtol``), when its actual or predicted relative decrease falls to float32 noise
    (``FTOL``), when no step decreases it, or at ``max_iter``. ``first`` (rows of directions)
    is tried as every row's first step where it descends, even from a point within ``tol``.
    Returns ``(state, n_iter)``; ``state`` is updated in place.
    """
    B = len(state.theta)
    dev = state.theta.device
    if state.f is None:
        state.f, state.g, _ = fun(state.theta, torch.arange(B, device=dev))
    theta, f, g, S, Y, rho, gamma = state.theta, state.f, state.g, state.S, state.Y, state.rho, state.gamma
    history = len(S)
    n_iter = torch.zeros(B, dtype=torch.long)
    active = (g.abs().amax(1) > tol).cpu() if first is None else torch.ones(B, dtype=torch.bool)
    active &= n_iter < max_iter
    while bool(active.any()):
        idx = active.nonzero().squeeze(1).to(dev)
        th, fa, ga = theta[idx], f[idx], g[idx]
        d = _two_loop(ga, S[:, idx], Y[:, idx], rho[:, idx], gamma[idx], state.k, lambda q: fun.precondition(q, idx))
        gtd = (ga * d).sum(1)
        flat = (-gtd.double() <= FTOL * torch.clamp(fa.abs(), min=1.0)).cpu()
        # without pairs, d = -gamma P g: a first step of at most unit length in P's metric
        t = torch.where((rho[:, idx] > 0).any(0), 1.0, torch.clamp(torch.rsqrt(-gtd / gamma[idx]), max=1.0))
        if first is not None:
            ours = first[idx]
            descent = (ga * ours).sum(1) < 0
            d, t = torch.where(descent[:, None], ours, d), torch.where(descent, 1.0, t)
            flat &= ~descent.cpu()
            first = None
        if bool(flat.any()):  # the predicted decrease is below float32 noise: converged
            active[idx.cpu()[flat]] = False
            continue
        th2, f2, g2, gmax, ok = _line_search(fun, idx, th, fa, ga, d, t)
        s, y = th2 - th, g2 - ga
        r, good = _curvature(s, y)
        slot = state.k % history
        S[slot, idx], Y[slot, idx] = s, y
        rho[slot, idx] = torch.where(ok, r, 0.0)
        yPy = (y * fun.precondition(y, idx)).sum(1)
        gamma[idx] = torch.where(ok & good, (s * y).sum(1) / torch.where(ok & good, yPy, 1.0), gamma[idx])
        theta[idx], f[idx], g[idx] = th2, f2, g2
        state.k += 1
        n_iter[idx.cpu()] += 1
        small = (fa - f2) <= FTOL * torch.clamp(f2.abs(), min=1.0)
        done = ((~ok) | small | (gmax <= tol)).cpu()
        active[idx.cpu()[done]] = False
        active &= n_iter < max_iter
    return state, n_iter


def strengths(Cs, n_fit: int, n_classes: int, device) -> torch.Tensor:
    """L2 strengths ``1 / (C n)`` (float64); two classes use ``C/2``: the multinomial problem
    then equals scikit-learn's binary one."""
    factor = 2.0 if n_classes == 2 else 1.0
    return torch.tensor([factor / (C * n_fit) for C in Cs], dtype=torch.float64, device=device)


def solve(obj: Objective, Cs, n_fit: int, start: State, *, max_iter: int, tol: float, eig=None, first=None):
    """Fit one problem per ``C`` from ``start`` (rows ``[W.ravel(), b]``): ``(state, n_iter)``."""
    lam = strengths(Cs, n_fit, obj.K, start.theta.device)
    V = h = None
    if eig is not None:
        V, h = eig[1], _scales(eig[0], lam, curvature=min(0.25, 1.0 / obj.K))
    return lbfgs(Batch(obj, lam, V, h), start, max_iter=max_iter, tol=tol, first=first)


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
