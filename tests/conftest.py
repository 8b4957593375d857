import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(12345)


@pytest.fixture(scope="session")
def lrgb_root(tmp_path_factory):
    """Small fixtures of the four LRGB tasks in LRGB's exact raw format (no network)."""
    from torch_geometric_chimera.lrgb import LRGB_TASKS, write_fixture
    root = str(tmp_path_factory.mktemp("lrgb"))
    for name in LRGB_TASKS:
        write_fixture(root, name)
    return root
