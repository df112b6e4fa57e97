import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a dev extra; the property tests skip without it
    settings = None

if settings is not None:
    # Property tests draw the same examples on every run (no example database, no
    # randomness): the suite stays deterministic, in CI as here.
    settings.register_profile("deterministic", derandomize=True, database=None)
    settings.load_profile("deterministic")

# The tests use tiny tensors: one intra-op thread avoids OpenMP spin-waiting when the two
# cores are shared with other processes (a 4x40 matmul took 13 ms with 2 contended threads).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
