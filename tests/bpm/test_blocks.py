import pytest
import torch

from block_partitioned_matrices import (
    Identity,
    Zero,
    add,
    common_dtype_device,
    is_leaf,
    matmul,
    scale,
    shape_of,
    sub,
    to_dense,
    transpose,
)


def test_zero_identity_basics():
    Z = Zero(2, 3, dtype=torch.float64)
    assert Z.shape == (2, 3) and Z.T.shape == (3, 2)
    assert torch.equal(Z.to_dense(), torch.zeros(2, 3, dtype=torch.float64))
    assert Z.to_dense(dtype=torch.float32).dtype == torch.float32
    I = Identity(3, scale=-2.5)
    assert I.shape == (3, 3) and I.T is I
    assert torch.equal(I.to_dense(dtype=torch.float64), -2.5 * torch.eye(3, dtype=torch.float64))
    assert torch.equal((2 * I).to_dense(), -5 * torch.eye(3))
    assert torch.equal((-I).to_dense(), 2.5 * torch.eye(3))
    assert all(is_leaf(a) for a in (Z, I, torch.ones(2, 2)))
    assert not is_leaf([[1.0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_against_dense(dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, generator=g).to(dtype)
    x1 = torch.randn(3, generator=g).to(dtype)
    x2 = torch.randn(3, 5, generator=g).to(dtype)
    for leaf, dense in ((A, A), (Zero(4, 3), torch.zeros(4, 3, dtype=dtype))):
        for x in (x1, x2):
            y = matmul(leaf, x)
            assert y.shape == (dense @ x).shape and y.dtype == dtype
            torch.testing.assert_close(y, dense @ x)
    I = Identity(3, 1.5)
    torch.testing.assert_close(matmul(I, x2), 1.5 * x2)
    torch.testing.assert_close(I @ x1, 1.5 * x1)
    # leaf @ leaf stays structured where possible
    assert isinstance(matmul(Zero(4, 3), Identity(3)), Zero)
    assert isinstance(matmul(A, Zero(3, 2)), Zero) and matmul(A, Zero(3, 2)).shape == (4, 2)
    P = matmul(Identity(3, 2.0), Identity(3, 3.0))
    assert isinstance(P, Identity) and P.scale == 6.0
    torch.testing.assert_close(matmul(A, Identity(3, 2.0)), 2 * A)


def test_add_sub_scale_transpose():
    A = torch.arange(4.0).reshape(2, 2)
    assert add(Zero(2, 2), A) is A and add(A, Zero(2, 2)) is A
    s = add(Identity(2, 1.0), Identity(2, 2.0))
    assert isinstance(s, Identity) and s.scale == 3.0
    torch.testing.assert_close(add(Identity(2, 2.0), A), A + 2 * torch.eye(2))
    torch.testing.assert_close(sub(A, Identity(2)), A - torch.eye(2))
    torch.testing.assert_close(to_dense(sub(Identity(2), A)), torch.eye(2) - A)
    torch.testing.assert_close(scale(A, 3), 3 * A)
    torch.testing.assert_close(transpose(A), A.T)
    assert transpose(Zero(2, 5)).shape == (5, 2)
    assert shape_of(Zero(2, 5)) == (2, 5) and shape_of(A) == (2, 2)


def test_errors():
    with pytest.raises(ValueError, match="rows"):
        Zero(-1, 2)
    with pytest.raises(ValueError, match="n must"):
        Identity(2.5)
    with pytest.raises(TypeError, match="scale"):
        Identity(2, scale="x")
    with pytest.raises(ValueError, match=r"shapes \(2, 2\) and \(3, 3\)"):
        add(torch.ones(2, 2), Identity(3))
    with pytest.raises(ValueError, match="need 3 rows"):
        matmul(torch.ones(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="need 2 rows"):
        matmul(Zero(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        shape_of(torch.ones(3))
    with pytest.raises(TypeError):
        shape_of("abc")
    with pytest.raises(TypeError, match="mixed dtypes"):
        common_dtype_device([torch.ones(1, 1), torch.ones(1, 1, dtype=torch.float64)])
    with pytest.raises(TypeError, match="mixed dtypes"):
        add(torch.ones(1, 1), Identity(1, dtype=torch.float64))
    with pytest.raises(TypeError, match="scalar"):
        scale(torch.ones(1, 1), "2")
    assert common_dtype_device([Zero(1, 1), Identity(1)]) == (None, None)
    dt, dv = common_dtype_device([Zero(1, 1), torch.ones(1, 1, dtype=torch.float64)])
    assert dt == torch.float64 and dv.type == "cpu"
