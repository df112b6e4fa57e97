import pytest
import torch

# The tests use tiny tensors: one intra-op thread avoids OpenMP spin-waiting when the two
# cores are shared with other processes (a 4x40 matmul took 13 ms with 2 contended threads).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
