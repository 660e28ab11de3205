"""Leaf blocks and uniform helpers on them.

A *leaf* block is one of

* a dense 2-D :class:`torch.Tensor` (used as is),
* :class:`Zero` ``(rows, cols)``: the zero matrix, stores nothing,
* :class:`Identity` ``(n, scale)``: ``scale * I_n``, stores nothing.

The helpers :func:`shape_of`, :func:`to_dense`, :func:`matmul`, :func:`add`,
:func:`sub`, :func:`scale` and :func:`transpose` accept any leaf (and, where it
makes sense, any structured matrix of this package, which all expose
``.shape``, ``.T``, ``.to_dense()`` and ``@`` with dense tensors).

>>> import torch
>>> A = torch.eye(2, dtype=torch.float64)
>>> to_dense(add(Identity(2, 3.0), A)).tolist()
[[4.0, 0.0], [0.0, 4.0]]
>>> matmul(Zero(3, 2), torch.ones(2, 5)).shape
torch.Size([3, 5])
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "Zero",
    "Identity",
    "is_leaf",
    "shape_of",
    "to_dense",
    "matmul",
    "add",
    "sub",
    "scale",
    "transpose",
    "common_dtype_device",
]


def _check_size(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def _check_scalar(s, what: str = "scalar"):
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(
            f"{what} must be a real Python number (int or float), got {type(s).__name__}"
        )
    return s


class Zero:
    """The ``rows x cols`` zero matrix; stores no entries.

    ``dtype``/``device`` are optional hints used only by :meth:`to_dense`.

    >>> import torch
    >>> Z = Zero(2, 3)
    >>> Z.shape, Z.T.shape
    ((2, 3), (3, 2))
    >>> torch.equal(Z @ torch.ones(3), torch.zeros(2))
    True
    """

    __slots__ = ("rows", "cols", "dtype", "device")

    def __init__(self, rows: int, cols: int, dtype: torch.dtype | None = None, device=None):
        self.rows = _check_size(rows, "rows")
        self.cols = _check_size(cols, "cols")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def T(self) -> Zero:
        return Zero(self.cols, self.rows, self.dtype, self.device)

    def to_dense(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Dense ``(rows, cols)`` zeros (dtype/device: argument, else hint, else default)."""
        return torch.zeros(
            self.rows,
            self.cols,
            dtype=dtype if dtype is not None else self.dtype,
            device=device if device is not None else self.device,
        )

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def __mul__(self, s):
        _check_scalar(s)
        return self

    __rmul__ = __mul__

    def __neg__(self):
        return self

    def __add__(self, other):
        return add(self, other)

    def __sub__(self, other):
        return sub(self, other)

    def __repr__(self) -> str:
        return f"Zero({self.rows}, {self.cols})"


class Identity:
    """``scale * I_n``; stores no entries.

    >>> import torch
    >>> I = Identity(3, scale=2.0)
    >>> (I @ torch.ones(3)).tolist()
    [2.0, 2.0, 2.0]
    >>> torch.equal(I.to_dense(), 2 * torch.eye(3))
    True
    """

    __slots__ = ("n", "scale", "dtype", "device")

    def __init__(self, n: int, scale: float = 1.0, dtype: torch.dtype | None = None, device=None):
        self.n = _check_size(n, "n")
        self.scale = _check_scalar(scale, "scale")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def T(self) -> Identity:
        return self

    def to_dense(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Dense ``scale * eye(n)``."""
        eye = torch.eye(
            self.n,
            dtype=dtype if dtype is not None else self.dtype,
            device=device if device is not None else self.device,
        )
        return eye if self.scale == 1 else eye * self.scale

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def __mul__(self, s):
        return Identity(self.n, self.scale * _check_scalar(s), self.dtype, self.device)

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1

    def __add__(self, other):
        return add(self, other)

    def __sub__(self, other):
        return sub(self, other)

    def __repr__(self) -> str:
        return f"Identity({self.n}, scale={self.scale})"


def is_leaf(a) -> bool:
    """True for a dense tensor, :class:`Zero` or :class:`Identity`."""
    return isinstance(a, (torch.Tensor, Zero, Identity))


def shape_of(a) -> tuple[int, int]:
    """``(rows, cols)`` of a 2-D tensor, leaf or structured matrix."""
    if isinstance(a, torch.Tensor):
        if a.dim() != 2:
            raise ValueError(f"a dense block must be a 2-D tensor, got shape {tuple(a.shape)}")
        return (int(a.shape[0]), int(a.shape[1]))
    s = getattr(a, "shape", None)
    if s is None or len(s) != 2:
        raise TypeError(
            "expected a 2-D tensor, Zero, Identity or a block-structured matrix, got "
            f"{type(a).__name__}"
        )
    return (int(s[0]), int(s[1]))


def _declared(a):
    """(dtype, device) a block commits to, entries may be None."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.device
    if isinstance(a, (Zero, Identity)):
        return a.dtype, a.device
    return getattr(a, "_dtype", None), getattr(a, "_device", None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def common_dtype_device(items, dtype=None, device=None, what: str = "blocks"):
    """The single (dtype, device) shared by ``items``; ``None`` where nothing is known.

    Raises :class:`TypeError` naming both when two items disagree.
    """
    device = torch.device(device) if device is not None else None
    for a in items:
        dt, dv = _declared(a)
        if dt is not None:
            if dtype is None:
                dtype = dt
            elif dt != dtype:
                raise TypeError(
                    f"mixed dtypes in {what}: {dtype} and {dt}; convert all to one dtype"
                )
        if dv is not None:
            if device is None:
                device = dv
            elif not _same_device(device, dv):
                raise TypeError(
                    f"mixed devices in {what}: {device} and {dv}; move all to one device"
                )
            elif device.index is None:
                device = dv
    return dtype, device


def to_dense(a, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """Dense 2-D tensor of any leaf or structured matrix (optionally cast/moved)."""
    if isinstance(a, torch.Tensor):
        shape_of(a)
        return a if dtype is None and device is None else a.to(dtype=dtype, device=device)
    if isinstance(a, (Zero, Identity)):
        return a.to_dense(dtype=dtype, device=device)
    if not hasattr(a, "to_dense"):
        raise TypeError(f"cannot densify {type(a).__name__}")
    d = a.to_dense()
    return d if dtype is None and device is None else d.to(dtype=dtype, device=device)


def _check_inner(a, b, n_b: int) -> None:
    ca = shape_of(a)[1]
    if ca != n_b:
        raise ValueError(
            f"cannot multiply {type(a).__name__} of shape {shape_of(a)} by an operand with "
            f"{n_b} rows; need {ca} rows"
        )


def matmul(a, b):
    """``a @ b`` for a leaf/structured ``a`` and ``b`` a dense ``(n,)``/``(n, k)`` tensor or leaf.

    Zero and Identity are never densified: ``Zero @ x`` is zeros shaped like
    the result, ``Identity(n, s) @ x`` is ``s * x``.
    """
    if isinstance(b, torch.Tensor):
        if b.dim() not in (1, 2):
            raise ValueError(f"right operand must be 1-D or 2-D, got shape {tuple(b.shape)}")
        _check_inner(a, b, int(b.shape[0]))
        if isinstance(a, Zero):
            return torch.zeros((a.rows,) + tuple(b.shape[1:]), dtype=b.dtype, device=b.device)
        if isinstance(a, Identity):
            return b * a.scale
        return a @ b
    rb, cb = shape_of(b)
    _check_inner(a, b, rb)
    ra = shape_of(a)[0]
    if isinstance(a, Zero) or isinstance(b, Zero):
        dt, dv = common_dtype_device([a, b])
        return Zero(ra, cb, dt, dv)
    if isinstance(b, Identity):
        return scale(a, b.scale)
    if isinstance(a, Identity):
        return scale(b, a.scale)
    if isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return (b.T @ a.T).T  # structured b: dense result
    return a @ b


def scale(a, s):
    """``s * a`` for a real Python scalar ``s``."""
    _check_scalar(s)
    return a * s


def transpose(a):
    """``a^T`` of any leaf or structured matrix."""
    shape_of(a)
    return a.T


def add(a, b):
    """``a + b`` of two leaves of equal shape (Zero and Identity stay structured)."""
    sa, sb = shape_of(a), shape_of(b)
    if sa != sb:
        raise ValueError(f"cannot add blocks of shapes {sa} and {sb}; shapes must be equal")
    if isinstance(a, Zero):
        return b
    if isinstance(b, Zero):
        return a
    if isinstance(a, Identity) and isinstance(b, Identity):
        return Identity(a.n, a.scale + b.scale, *common_dtype_device([a, b]))
    dt, dv = common_dtype_device([a, b])
    return to_dense(a, dt, dv) + to_dense(b, dt, dv)


def sub(a, b):
    """``a - b`` of two leaves of equal shape."""
    return add(a, scale(b, -1))
