import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: the tensors in these tests are tiny, and on 2 cores shared with other
    jobs OpenMP's spinning threads oversubscribe. Test modules opt in with pytestmark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
