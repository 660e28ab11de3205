import pytest
import torch

from block_partitioned_matrices import BlockVector


@pytest.mark.parametrize("k", [None, 1, 4])
def test_round_trip_and_arithmetic(k):
    g = torch.Generator().manual_seed(1)
    sizes = [3, 1, 4, 2]
    shape = (10,) if k is None else (10, k)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(*shape, generator=g, dtype=torch.float64)
    vx, vy = BlockVector.from_dense(x, sizes), BlockVector.from_dense(y, sizes)
    assert vx.sizes == tuple(sizes) and len(vx) == 4 and vx.ncols == k
    assert vx.dtype == torch.float64 and vx.device.type == "cpu"
    assert torch.equal(vx.to_dense(), x)
    assert torch.equal((vx + vy).to_dense(), x + y)
    assert torch.equal((vx - vy).to_dense(), x - y)
    assert torch.equal((2.5 * vx).to_dense(), 2.5 * x)
    assert torch.equal((vx * 3).to_dense(), 3 * x)
    assert torch.equal((-vx).to_dense(), -x)
    assert [b.shape[0] for b in vx] == sizes and torch.equal(vx[2], x[4:8])


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        BlockVector([])
    with pytest.raises(ValueError, match=r"\(m_i,\) or all \(m_i, k\)"):
        BlockVector([torch.ones(2), torch.ones(2, 1)])
    with pytest.raises(ValueError, match="one k"):
        BlockVector([torch.ones(2, 2), torch.ones(2, 3)])
    with pytest.raises(ValueError, match="expected"):
        BlockVector([torch.ones(2, 2, 2)])
    with pytest.raises(TypeError, match="mixed dtypes"):
        BlockVector([torch.ones(2), torch.ones(2, dtype=torch.float64)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        BlockVector([[1.0, 2.0]])
    with pytest.raises(ValueError, match="do not partition"):
        BlockVector.from_dense(torch.ones(5), [2, 2])
    with pytest.raises(ValueError, match="sizes/ncols differ"):
        BlockVector([torch.ones(2)]) + BlockVector([torch.ones(3)])
    with pytest.raises(TypeError):
        BlockVector([torch.ones(2)]) + torch.ones(2)
    with pytest.raises(TypeError):
        BlockVector([torch.ones(2)]) * "a"
