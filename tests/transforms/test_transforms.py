import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from torch_geometric_chimera.transforms import ImageToGrid, SequenceToLine, grid_edge_index, line_edge_index
from torch_geometric_chimera.utils import grid_graph_dags, line_graph_dags


def edge_set(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


@pytest.mark.parametrize("patch_size", [1, 2])
def test_image_to_grid_patches_follow_unfold_in_raster_order(patch_size):
    image = torch.randn(3, 4, 6)
    data = ImageToGrid(patch_size)(Data(x=image, y=torch.tensor([7])))
    h, w = 4 // patch_size, 6 // patch_size
    # nn.Unfold with stride = kernel cuts the same patches, [C * p * p, h * w] in raster order.
    expected = F.unfold(image.unsqueeze(0), patch_size, stride=patch_size)[0].t()
    assert torch.equal(data.x, expected)
    assert data.grid_size.tolist() == [[h, w]]
    assert data.num_nodes == h * w
    assert torch.equal(data.y, torch.tensor([7]))  # other keys are kept
    assert torch.equal(data.pos[:, 0] * w + data.pos[:, 1], torch.arange(h * w, dtype=data.pos.dtype))


def test_grid_edges_are_the_4_neighbours_and_the_union_of_the_4_grid_dags():
    h, w = 3, 5
    edge_index = grid_edge_index(h, w)
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    expected = {(a, b) for a in range(h * w) for b in range(h * w)
                if abs(int(rows[a] - rows[b])) + abs(int(cols[a] - cols[b])) == 1}
    assert edge_set(edge_index) == expected
    assert edge_index.size(1) == len(expected)  # no duplicates
    assert set().union(*(edge_set(dag) for dag in grid_graph_dags(h, w))) == expected
    # sorted by target, then source
    key = edge_index[1] * h * w + edge_index[0]
    assert bool((key[1:] > key[:-1]).all())


def test_image_to_grid_accepts_a_bare_tensor_and_a_2d_image():
    data = ImageToGrid()(torch.arange(6.0).view(2, 3))
    assert data.x.shape == (6, 1) and torch.equal(data.x[:, 0], torch.arange(6.0))
    assert data.grid_size.tolist() == [[2, 3]]


def test_image_to_grid_batches_images_of_different_sizes():
    dataset = [ImageToGrid(2)(Data(x=torch.randn(1, 2 * h, 2 * w), y=torch.tensor([h])))
               for h, w in [(2, 3), (4, 1), (1, 1)]]
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch.grid_size.tolist() == [[2, 3], [4, 1], [1, 1]]
    sizes = batch.grid_size.prod(dim=1)
    assert torch.equal(torch.bincount(batch.batch), sizes)
    # every edge stays inside its image and matches that image's own grid after the offset
    offsets = torch.cumsum(sizes, 0) - sizes
    for g, (h, w) in enumerate(batch.grid_size.tolist()):
        mask = batch.batch[batch.edge_index[0]] == g
        assert edge_set(batch.edge_index[:, mask] - offsets[g]) == edge_set(grid_edge_index(h, w))


@pytest.mark.parametrize("bad, message", [
    (dict(patch_size=0), "patch_size: expected a positive int"),
    (dict(patch_size=True), "patch_size: expected a positive int"),
])
def test_image_to_grid_rejects_a_bad_patch_size(bad, message):
    with pytest.raises(ValueError, match=message):
        ImageToGrid(**bad)


def test_image_to_grid_rejects_sizes_that_are_not_multiples_and_non_images():
    with pytest.raises(ValueError, match="x: image height and width must be multiples of patch_size=2"):
        ImageToGrid(2)(Data(x=torch.randn(1, 3, 4)))
    with pytest.raises(ValueError, match=r"x: expected an image tensor of shape \[C, H, W\]"):
        ImageToGrid()(Data(x=torch.randn(5)))


@pytest.mark.parametrize("directed", [False, True])
def test_sequence_to_line(directed):
    tokens = torch.randint(0, 256, (7,))
    data = SequenceToLine(directed=directed)(Data(x=tokens, y=torch.tensor([1])))
    forward = {(t, t + 1) for t in range(6)}
    expected = forward if directed else forward | {(b, a) for a, b in forward}
    assert edge_set(data.edge_index) == expected and data.edge_index.size(1) == len(expected)
    assert torch.equal(data.x, tokens) and torch.equal(data.y, torch.tensor([1]))
    assert data.seq_len.tolist() == [7] and torch.equal(data.pos[:, 0], torch.arange(7.0))
    fwd, bwd = line_graph_dags(7)
    assert edge_set(fwd) == forward and (directed or edge_set(bwd) | forward == expected)


def test_sequence_to_line_batches_sequences_of_different_lengths():
    dataset = [SequenceToLine()(torch.randint(0, 9, (t,))) for t in (5, 1, 3)]
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch.seq_len.tolist() == [5, 1, 3]
    assert torch.equal(torch.bincount(batch.batch), batch.seq_len)
    assert batch.edge_index.size(1) == 2 * (4 + 0 + 2)
    assert bool((batch.batch[batch.edge_index[0]] == batch.batch[batch.edge_index[1]]).all())
    assert edge_set(line_edge_index(1)) == set()


def test_sequence_to_line_rejects_a_non_sequence():
    with pytest.raises(ValueError, match=r"x: expected a token tensor of shape \[T\] or \[T, F\]"):
        SequenceToLine()(Data(x=torch.zeros(2, 3, 4)))
