import pytest
import torch

from mplus_fast.chunking import chunk_ids, chunk_sizes


@pytest.mark.parametrize("n,size,want", [
    (0, 256, []), (10, 256, [10]), (256, 256, [256]), (512, 256, [256, 256]),
    (520, 256, [256, 264]),          # a tail of 8 < 16 joins the last chunk
    (528, 256, [256, 256, 16]),      # 16 is long enough
    (37, 8, [8, 8, 8, 13]),  # chunks shorter than 16: the tail joins when shorter than a chunk
])
def test_chunk_sizes(n, size, want):
    assert chunk_sizes(n, size) == want
    assert sum(want) == n


def test_chunk_ids_views_cover_the_document():
    ids = torch.arange(525)
    chunks = chunk_ids(ids, 256)
    assert [c.numel() for c in chunks] == [256, 269]
    assert torch.equal(torch.cat(chunks), ids)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_sizes(100, bad)
