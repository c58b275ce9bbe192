"""Orthogonal rotations of the residual stream: randomized Hadamard matrices of any size that has one we
can build, else a seeded random orthogonal matrix (QuaRot, arXiv 2404.00456; SpinQuant 2405.16406).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I; Q = diag(d) H / sqrt(n), with d a seeded
random sign vector, is orthogonal and spreads any one channel evenly over all n (|Q_ij| = 1/sqrt(n)):
an outlier channel of the residual stream becomes a small shift of every channel. Orders built here:

  2^k              Sylvester: H_2n = [[H, H], [H, -H]]
  q + 1            Paley I, q a prime = 3 (mod 4)
  2 (q + 1)        Paley II, q a prime = 1 (mod 4)
  m * 2^k          the Kronecker product of one of the two above with a Sylvester matrix

(SmolLM2's 576 = 36 * 16, 36 = 2 (17 + 1) by Paley II; LLaMA's 4096 = 2^12; Qwen2-1.5B's 1536 = 12 * 128,
12 = 11 + 1 by Paley I.) For an order with none (a multiple of 4 is conjectured to always have one, but
not by these constructions), the rotation is a Haar-random orthogonal matrix from the same seed, which
spreads outliers as well on average, without the equal-magnitude guarantee.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rotation:
    """The matrix and how it was made (the report says which)."""

    matrix: np.ndarray     # [n, n] float64, orthogonal
    kind: str              # "hadamard" or "random orthogonal"
    construction: str      # e.g. "Paley II (q=17) x Sylvester 16", or why no Hadamard matrix was built
    seed: int


def rotation(n: int, seed: int) -> Rotation:
    """The residual stream's rotation of order n: a randomized Hadamard matrix when one of order n can be
    built here, else a random orthogonal one; both from `seed`."""
    rng = np.random.default_rng(seed)
    built = hadamard(n)
    if built is not None:
        h, construction = built
        signs = rng.choice(np.array([-1.0, 1.0]), size=n)
        return Rotation(signs[:, None] * h / np.sqrt(n), "hadamard", construction, seed)
    return Rotation(random_orthogonal(n, rng), "random orthogonal",
                    f"no Hadamard matrix of order {n} from Sylvester or Paley constructions", seed)


def hadamard(n: int) -> tuple[np.ndarray, str] | None:
    """A Hadamard matrix of order n (float64 +-1 entries) and its construction, or None."""
    if n < 1:
        return None
    power = n & -n            # the largest power of two dividing n
    m = n // power
    # Try the smallest base order first: m * 2^j for j = 0, 1, ... while m * 2^j divides n.
    base_order = m
    while base_order <= n:
        base = _base_hadamard(base_order)
        if base is not None:
            h, name = base
            rest = n // base_order
            if rest > 1:
                h = np.kron(h, _sylvester(rest))
                name = f"{name} x Sylvester {rest}" if name else f"Sylvester {rest}"
            return h, name or "Sylvester 1"
        base_order *= 2
    return None


def _base_hadamard(order: int) -> tuple[np.ndarray, str] | None:
    if order == 1:
        return np.ones((1, 1)), ""
    if order == 2:
        return _sylvester(2), "Sylvester 2"
    if order % 4:
        return None
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return _paley_one(order - 1), f"Paley I (q={order - 1})"
    if _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return _paley_two(order // 2 - 1), f"Paley II (q={order // 2 - 1})"
    return None


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """J_ij = chi(j - i) over GF(q), chi the quadratic character (0 at 0, 1 on squares, -1 otherwise)."""
    squares = np.zeros(q, dtype=bool)
    squares[(np.arange(1, q) ** 2) % q] = True
    chi = np.where(squares, 1.0, -1.0)
    chi[0] = 0.0
    index = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[index]


def _paley_one(q: int) -> np.ndarray:
    """Order q + 1 for a prime q = 3 (mod 4): I + S, S = [[0, 1^T], [-1, J]] skew-symmetric."""
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1) + s


def _paley_two(q: int) -> np.ndarray:
    """Order 2 (q + 1) for a prime q = 1 (mod 4): C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]], with C
    the symmetric conference matrix [[0, 1^T], [1, J]]."""
    c = np.zeros((q + 1, q + 1))
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1.0, -1.0], [-1.0, -1.0]])) + np.kron(np.eye(q + 1), np.array([[1.0, 1.0], [1.0, -1.0]]))


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q ** 0.5) + 1))


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix: QR of a Gaussian matrix, columns' signs fixed by R's diagonal."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


@dataclass(frozen=True)
class OnlineRotation:
    """An orthogonal Q of order n = outer * inner applied at run time as two small products instead of one
    n x n: x Q = vec(A^T X B) / norm for X = (x * signs) reshaped [outer, inner] and Q = diag(signs) (A (x) B) /
    norm; A is Hadamard of order `outer` or, where none is built here, the identity (Q is then block-
    diagonal: a Hadamard rotation within each block of `inner` channels). Costs n * (inner + outer) multiply-
    adds a row instead of n^2 (1536 = 12 x 128: 215k instead of 2.4M)."""

    outer: np.ndarray | None   # [outer, outer] +-1 Hadamard, or None for the identity
    inner: np.ndarray          # [inner, inner] +-1 Sylvester
    signs: np.ndarray          # [n] +-1
    construction: str
    rank: int | None = None    # the rank of the input it is applied to, once known (the graph's Reshapes need it)

    @property
    def n(self) -> int:
        return self.signs.size

    @property
    def norm(self) -> float:
        """What A (x) B is divided by to be orthogonal: sqrt of the Hadamard orders in it."""
        return float(np.sqrt(self.inner.shape[0] * (self.outer.shape[0] if self.outer is not None else 1)))

    def matrix(self) -> np.ndarray:
        """The dense Q (tests; the weights' side is rotated with rotate_rows)."""
        outer = self.outer if self.outer is not None else np.eye(self.n // self.inner.shape[0])
        return self.signs[:, None] * np.kron(outer, self.inner) / self.norm

    def rotate_rows(self, w: np.ndarray) -> np.ndarray:
        """Q^T W for W [n, N], without forming Q: the transform applied along the rows."""
        m, p = self.n // self.inner.shape[0], self.inner.shape[0]
        x = (self.signs[:, None] * w).reshape(m, p, -1)
        x = np.einsum("ij,mjn->min", self.inner.T, x)          # B^T within each block
        if self.outer is not None:
            x = np.einsum("ij,jpn->ipn", self.outer.T, x)      # A^T across blocks
        return x.reshape(w.shape) / self.norm


MAX_INNER = 128   # the inner factor's order: a [128, 128] product a row stays cheap beside the linear it feeds


def online_rotation(n: int, seed: int) -> OnlineRotation | None:
    """The run-time rotation of order n (a linear's input), or None when n has no power-of-two factor >= 16
    (a Hadamard block smaller than that spreads too little to be worth the extra op)."""
    power = n & -n
    inner = min(power, MAX_INNER)
    if inner < 16:
        return None
    outer_order = n // inner
    built = hadamard(outer_order) if outer_order > 1 else None
    outer = built[0] if built is not None else None
    construction = (f"{built[1]} x Sylvester {inner}" if built is not None and outer_order > 1 else
                    f"Sylvester {inner}" if outer_order == 1 else
                    f"block-diagonal: {outer_order} blocks of Sylvester {inner} (no Hadamard matrix of order {outer_order})")
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return OnlineRotation(outer, _sylvester(inner), signs, construction)
