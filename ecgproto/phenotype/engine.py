"""The association engine: per (feature, phecode) logistic regression on age and sex, at PheWAS scale.

For each phecode the null model (intercept, age, sex) is fitted once; every feature is then screened
at once with the efficient score statistic, which needs only matrix products of the feature matrix
with per-phecode weight and residual columns. Pairs whose score p passes `screen_p` are refitted
exactly: Newton-Raphson with Wald inference, or Firth's penalised likelihood (p from the penalised
likelihood ratio) when cases are few or the ordinary fit separates or does not converge.

Rows are independent units (subjects): a study that uses several admissions per subject pools them
into one row per subject first (`ecgproto.phenotype.study`), so no test here relies on a
cluster-robust variance, which is badly biased for rare phecodes and separated features.

    logit P(case) = b0 + b * x + g1 * age + g2 * sex      (sex dropped for sex-specific phecodes)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import sparse, special, stats

from ecgproto.phenotype.phecodes import PhecodeStatus

RESULT_COLUMNS = [
    "feature_set",
    "feature_id",
    "feature_label",
    "branch",
    "prototype_class",
    "phecode",
    "phecode_string",
    "phecode_category",
    "sex_restriction",
    "n_cases",
    "n_controls",
    "n_excluded",
    "beta",
    "standard_error",
    "odds_ratio",
    "ci_low",
    "ci_high",
    "p_value",
    "neg_log_p",
    "bonferroni_threshold",
    "significant_bonf",
    "q_fdr",
    "significant_fdr",
    "method",
    "converged",
]

# Columns of few distinct values, stored as categories (a million-row table stays small).
CATEGORY_COLUMNS = (
    "feature_set",
    "branch",
    "prototype_class",
    "phecode",
    "phecode_string",
    "phecode_category",
    "sex_restriction",
    "method",
)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    screen_p: float = Field(
        1e-3, gt=0, le=1, description="refit exactly where the score test p is at most this (1 = refit all)"
    )
    firth_below_cases: int = Field(100, ge=0, description="use Firth's penalised fit when cases are fewer")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise level (Bonferroni) and FDR level (BH)")
    block: int = Field(128, ge=1, description="phecodes per block (bounds memory: n x block columns)")
    max_iter: int = Field(50, ge=1)
    tol: float = Field(1e-10, gt=0)


@dataclass
class FeatureSet:
    """A named feature matrix over the cohort rows, and what each column is."""

    name: str
    values: np.ndarray  # (n, m) float
    features: pd.DataFrame  # feature_id, feature_label, branch, prototype_class

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.features):
            raise ValueError(f"feature set {self.name!r}: values {self.values.shape} vs {len(self.features)} features")
        for col in ("feature_id", "feature_label", "branch", "prototype_class"):
            if col not in self.features.columns:
                self.features[col] = ""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return special.expit(x)  # overflow-free


def _covariate_information(ZZ: np.ndarray, w: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """Per phecode Z' W Z (b, k, k) from ZZ (n, k*k) and weights w (n, b); a dropped covariate's row and
    column become the identity's, so its coefficient stays 0 and the matrix stays invertible."""
    k = drop.shape[1]
    info = (ZZ.T @ w).T.reshape(-1, k, k)
    dropped = drop[:, :, None] | drop[:, None, :]
    return np.where(dropped, 0.0, info) + np.eye(k) * (drop[:, :, None] & drop[:, None, :])


def _loglik(y: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Bernoulli log-likelihood per fit; eta (..., n)."""
    return (y * eta - np.logaddexp(0.0, eta)).sum(axis=-1)


@dataclass
class RefitResult:
    beta: float
    se: float
    p: float
    method: str
    converged: bool


def newton_logit(
    X: np.ndarray, y: np.ndarray, max_iter: int = 50, tol: float = 1e-10, start: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched maximum likelihood: X (H, n, p), y (n,) -> beta (H, p), covariance (H, p, p), converged (H,).
    `start` (H, p): a warm start (the null fit and the score step put Newton a step or two from the optimum)."""
    h, n, p = X.shape
    beta = np.zeros((h, p)) if start is None else start.astype(np.float64).copy()
    converged = np.zeros(h, dtype=bool)
    for _ in range(max_iter):
        eta = np.einsum("hnp,hp->hn", X, beta)
        mu = _sigmoid(eta)
        w = mu * (1 - mu)
        info = np.einsum("hnp,hn,hnq->hpq", X, w, X)
        grad = np.einsum("hnp,hn->hp", X, y - mu)
        try:
            step = np.linalg.solve(info, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break
        step = np.where(np.isfinite(step), step, 0.0)
        beta = beta + np.clip(step, -5, 5)
        converged = np.abs(step).max(axis=1) < tol
        if converged.all():
            break
    mu = _sigmoid(np.einsum("hnp,hp->hn", X, beta))
    info = np.einsum("hnp,hn,hnq->hpq", X, mu * (1 - mu), X)
    with np.errstate(all="ignore"):
        cov = np.linalg.pinv(info)
    return beta, cov, converged


def firth_logit(
    X: np.ndarray, y: np.ndarray, max_iter: int = 200, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Firth's bias-reduced logistic regression: X (n, p) -> beta, covariance, penalised loglik, converged.

    Maximises l(b) + 0.5 log|I(b)| with the modified score X'(y - mu + h (1/2 - mu)) and step halving;
    converged when both the step and the modified score are below `tol` (logistf's xconv/gconv).
    """
    n, p = X.shape

    def penalised(beta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        eta = X @ beta
        mu = _sigmoid(eta)
        w = mu * (1 - mu)
        info = X.T @ (X * w[:, None])
        sign, logdet = np.linalg.slogdet(info)
        return float(_loglik(y, eta) + 0.5 * logdet) if sign > 0 else -np.inf, mu, w, info

    beta = np.zeros(p)
    value, mu, w, info = penalised(beta)
    converged = False
    for _ in range(max_iter):
        inv = np.linalg.pinv(info)
        hat = np.einsum("np,pq,nq->n", X, inv, X) * w
        score = X.T @ (y - mu + hat * (0.5 - mu))
        step = inv @ score
        step = step * min(1.0, 5.0 / max(np.abs(step).max(), 1e-300))
        for _ in range(30):  # step halving keeps the penalised likelihood from going down
            new_value, new_mu, new_w, new_info = penalised(beta + step)
            if new_value >= value - 1e-12:
                break
            step = step / 2
        beta = beta + step
        value, mu, w, info = new_value, new_mu, new_w, new_info
        if np.abs(step).max() < tol and np.abs(score).max() < tol:
            converged = True
            break
    return beta, np.linalg.pinv(info), value, converged


@dataclass
class AssociationEngine:
    """Fit once per cohort (`fit`: null models), then `test` any number of feature sets.

    covariates: (n, k) with the intercept first; `drop` (J, k) marks covariates left out per phecode
    (sex for sex-specific phecodes). status: (n, J) 1 case, 0 control, -1 excluded.
    """

    config: EngineConfig = field(default_factory=EngineConfig)
    covariates_: np.ndarray | None = None
    status_: PhecodeStatus | None = None
    drop_: np.ndarray | None = None
    null_beta_: np.ndarray | None = None  # (J, k)
    null_converged_: np.ndarray | None = None

    def fit(self, age: np.ndarray, male: np.ndarray, status: PhecodeStatus) -> AssociationEngine:
        """Null models of every phecode. Rows must be independent (one per subject)."""
        n = len(age)
        if status.status.shape[0] != n or len(male) != n:
            raise ValueError(f"age ({n}), sex ({len(male)}) and phecode status ({status.status.shape[0]}) rows differ")
        if not np.isfinite(age).all():
            raise ValueError("age has missing values; drop those admissions from the cohort first")
        self.covariates_ = np.column_stack([np.ones(n), (age - 60.0) / 10.0, male.astype(float)])
        self.status_ = status
        sex_specific = status.phecodes["sex"].astype(str).str.match(r"^(Male|Female)").to_numpy()
        # Sex also drops out where the cases (or the controls) are all of one sex, e.g. breast cancer's
        # parent phecode: its maximum-likelihood sex effect is infinite (separation).
        one_sex = np.zeros(status.status.shape[1], dtype=bool)
        for level in (0, 1):
            group = status.status == level
            n_male = (group & male[:, None]).sum(axis=0)
            one_sex |= (n_male == 0) | (n_male == group.sum(axis=0))
        self.drop_ = np.zeros((status.status.shape[1], 3), dtype=bool)
        self.drop_[sex_specific | one_sex, 2] = True
        J = status.status.shape[1]
        self.null_beta_ = np.zeros((J, 3))
        self.null_converged_ = np.zeros(J, dtype=bool)
        for lo in range(0, J, self.config.block):
            cols = slice(lo, min(lo + self.config.block, J))
            self.null_beta_[cols], self.null_converged_[cols] = self._null_block(cols)
        return self

    def _block(self, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        s = self.status_.status[:, cols]
        return (s == 1).astype(np.float64), (s >= 0).astype(np.float64)

    def _null_block(self, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Batched IRLS of the null model for a block of phecodes.

        The null model sees only the covariates, so admissions that share them (ages are whole years in
        MIMIC: ~150 age x sex patterns) are pooled into binomial counts first; the fit is the same.
        """
        Z = self.covariates_
        y, m = self._block(cols)
        patterns, inverse = np.unique(Z, axis=0, return_inverse=True)
        if len(patterns) <= len(Z) // 4:
            pool = sparse.csr_matrix(
                (np.ones(len(Z)), (inverse.ravel(), np.arange(len(Z)))), shape=(len(patterns), len(Z))
            )
            Z, y, m = patterns, pool @ (y * m), pool @ m  # cases and at-risk counts per pattern
        b, k = y.shape[1], Z.shape[1]
        drop = self.drop_[cols]
        ZZ = np.einsum("nk,nl->nkl", Z, Z).reshape(len(Z), k * k)
        beta = np.zeros((b, k))
        prevalence = np.clip(y.sum(0) / np.maximum(m.sum(0), 1), 1e-6, 1 - 1e-6)
        beta[:, 0] = np.log(prevalence / (1 - prevalence))
        converged = np.zeros(b, dtype=bool)
        for _ in range(self.config.max_iter):
            todo = np.flatnonzero(~converged)  # only the phecodes still moving
            if len(todo) == 0:
                break
            mu = _sigmoid(Z @ beta[todo].T)
            mt, dt = m[:, todo], drop[todo]
            grad = (Z.T @ (y[:, todo] - mt * mu)).T  # (t, k); y holds case counts, m at-risk counts
            info = _covariate_information(ZZ, mt * mu * (1 - mu), dt)
            grad = np.where(dt, 0.0, grad)
            step = (np.linalg.pinv(info) @ grad[..., None])[..., 0]
            beta[todo] += np.clip(step, -5, 5)
            converged[todo] = np.abs(step).max(axis=1) < self.config.tol
        return beta, converged

    def _null_terms(self, cols: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Residuals r, weights w (n, b) and the inverse null information (b, k, k) of a block."""
        Z = self.covariates_
        y, m = self._block(cols)
        mu = _sigmoid(Z @ self.null_beta_[cols].T)
        w = m * mu * (1 - mu)
        k = Z.shape[1]
        drop = self.drop_[cols]
        ZZ = np.einsum("nk,nl->nkl", Z, Z).reshape(len(Z), k * k)
        keep = ~(drop[:, :, None] | drop[:, None, :])
        inv = np.linalg.inv(_covariate_information(ZZ, w, drop)) * keep
        return m * (y - mu), w, inv

    def score_block(self, F: np.ndarray, F2: np.ndarray, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Score statistic U and its variance V (m, b) for all features against a block of phecodes."""
        Z = self.covariates_
        r, w, inv = self._null_terms(cols)
        b, k = r.shape[1], Z.shape[1]
        dtype = F.dtype
        stacked = np.concatenate([r] + [w * Z[:, [c]] for c in range(k)], axis=1).astype(dtype)  # (n, (1+k) b)
        prod = (F.T @ stacked).astype(np.float64)  # (m, (1+k) b): the only O(n m b) products
        U = prod[:, :b]
        A = prod[:, b:].reshape(F.shape[1], k, b)  # A[:, c, j] = F' W_j z_c
        V = (F2.T @ w.astype(dtype)).astype(np.float64) - np.einsum("mcj,jcd,mdj->mj", A, inv, A)
        return U, V

    def test(self, fs: FeatureSet) -> pd.DataFrame:
        """All (feature, phecode) pairs of one feature set -> the result table (RESULT_COLUMNS)."""
        if self.status_ is None:
            raise RuntimeError("call fit(age, male, status) before test()")
        F = np.ascontiguousarray(fs.values, dtype=np.float32)
        if F.shape[0] != self.covariates_.shape[0]:
            raise ValueError(f"feature set {fs.name!r} has {F.shape[0]} rows, the cohort {self.covariates_.shape[0]}")
        if not np.isfinite(F).all():
            raise ValueError(f"feature set {fs.name!r} has non-finite values")
        F2 = F * F
        J = self.status_.status.shape[1]
        m = F.shape[1]
        beta = np.full((m, J), np.nan)
        se = np.full((m, J), np.nan)
        p = np.full((m, J), np.nan)
        method = np.full((m, J), "score", dtype=object)
        converged = np.ones((m, J), dtype=bool)
        for lo in range(0, J, self.config.block):
            cols = slice(lo, min(lo + self.config.block, J))
            U, V = self.score_block(F, F2, cols)
            ok = V > 1e-9 * np.maximum(F2.sum(0), 1.0)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                beta[:, cols] = np.where(ok, U / V, np.nan)  # one-step estimate from the null
                se[:, cols] = np.where(ok, 1 / np.sqrt(V), np.nan)
                p[:, cols] = np.where(ok, stats.chi2.sf(U * U / V, 1), np.nan)
            method[:, cols] = np.where(ok, "score", "constant")
            converged[:, cols] = self.null_converged_[cols][None, :]
        hits = np.argwhere(p <= self.config.screen_p)
        for j in np.unique(hits[:, 1]):
            feats = hits[hits[:, 1] == j, 0]
            for i, res in zip(feats, self.refit(F[:, feats].astype(np.float64), j, beta[feats, j]), strict=True):
                beta[i, j], se[i, j], p[i, j], method[i, j], converged[i, j] = (
                    res.beta,
                    res.se,
                    res.p,
                    res.method,
                    res.converged,
                )
        return self._table(fs, beta, se, p, method, converged)

    def refit(self, x: np.ndarray, j: int, score_beta: np.ndarray | None = None) -> list[RefitResult]:
        """Exact fits of phecode j on the features in x (n, h); `score_beta` (h,) the one-step estimates."""
        s = self.status_.status[:, j]
        rows = s >= 0
        y = (s[rows] == 1).astype(np.float64)
        Z = self.covariates_[rows][:, ~self.drop_[j]]
        xs = x[rows]
        n_cases = int(y.sum())
        out: list[RefitResult | None] = [None] * xs.shape[1]
        firth = np.full(xs.shape[1], n_cases < self.config.firth_below_cases)
        todo = np.flatnonzero(~firth)
        for lo in range(0, len(todo), 32):
            idx = todo[lo : lo + 32]
            X = np.concatenate([np.broadcast_to(Z, (len(idx),) + Z.shape), xs[:, idx].T[:, :, None]], axis=2)
            start = np.zeros((len(idx), X.shape[2]))
            start[:, :-1] = self.null_beta_[j][~self.drop_[j]]
            if score_beta is not None:
                start[:, -1] = np.nan_to_num(np.clip(score_beta[idx], -5, 5))
            b, cov, conv = newton_logit(X, y, self.config.max_iter, self.config.tol, start)
            for t, i in enumerate(idx):
                bx, vx = b[t, -1], cov[t, -1, -1]
                if not conv[t] or not np.isfinite(bx) or abs(bx) > 15 or not vx > 0:
                    firth[i] = True  # separation or no convergence: Firth
                    continue
                sx = float(np.sqrt(vx))
                out[i] = RefitResult(float(bx), sx, float(2 * stats.norm.sf(abs(bx / sx))), "wald", True)
        if firth.any():
            _, _, null_value, null_conv = firth_logit(Z, y)
            for i in np.flatnonzero(firth):
                X1 = np.column_stack([Z, xs[:, i]])
                b, cov, value, conv = firth_logit(X1, y)
                lr = max(2 * (value - null_value), 0.0)
                out[i] = RefitResult(
                    float(b[-1]),
                    float(np.sqrt(max(cov[-1, -1], 0.0))),
                    float(stats.chi2.sf(lr, 1)),
                    "firth",
                    bool(conv and null_conv),
                )
        return [r for r in out if r is not None]

    def _table(
        self, fs: FeatureSet, beta: np.ndarray, se: np.ndarray, p: np.ndarray, method: np.ndarray, converged: np.ndarray
    ) -> pd.DataFrame:
        m, J = beta.shape
        ph = self.status_.phecodes
        fi = np.repeat(np.arange(m), J)
        pj = np.tile(np.arange(J), m)
        n_tests = int(np.isfinite(p).sum())
        threshold = self.config.alpha / max(n_tests, 1)
        flat_p = p.ravel()
        q = bh_fdr(flat_p)
        b, s = beta.ravel(), se.ravel()
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            table = pd.DataFrame(
                {
                    "feature_set": fs.name,
                    "feature_id": fs.features["feature_id"].astype(str).to_numpy()[fi],
                    "feature_label": fs.features["feature_label"].astype(str).to_numpy()[fi],
                    "branch": fs.features["branch"].astype(str).to_numpy()[fi],
                    "prototype_class": fs.features["prototype_class"].astype(str).to_numpy()[fi],
                    "phecode": ph["phecode"].to_numpy()[pj],
                    "phecode_string": ph["phecode_string"].to_numpy()[pj],
                    "phecode_category": ph["phecode_category"].to_numpy()[pj],
                    "sex_restriction": ph["sex"].to_numpy()[pj],
                    "n_cases": ph["n_cases"].to_numpy()[pj],
                    "n_controls": ph["n_controls"].to_numpy()[pj],
                    "n_excluded": ph["n_excluded"].to_numpy()[pj],
                    "beta": b,
                    "standard_error": s,
                    "odds_ratio": np.exp(b),
                    "ci_low": np.exp(b - 1.959963984540054 * s),
                    "ci_high": np.exp(b + 1.959963984540054 * s),
                    "p_value": flat_p,
                    "neg_log_p": -np.log10(np.maximum(flat_p, 1e-300)),
                    "bonferroni_threshold": threshold,
                    "significant_bonf": flat_p < threshold,
                    "q_fdr": q,
                    "significant_fdr": q < self.config.alpha,
                    "method": method.ravel(),
                    "converged": converged.ravel(),
                }
            )
        for col in CATEGORY_COLUMNS:
            table[col] = table[col].astype("category")
        return table[RESULT_COLUMNS]


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p stay NaN and do not count as tests."""
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order] * len(ok) / np.arange(1, len(ok) + 1)
    q[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return q
