import os

# The Triton interpreter's tile products go through NumPy's OpenBLAS, whose own threads fight the
# pytest workers for the cores: one BLAS thread per worker made interpreted kernels 2-3x faster
# (a 257 x 80 softmax forward+backward: 2.8 s -> 1.1 s). It must be set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run through the interpreter on the CPU (how CI tests them).
# It must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs one pytest worker per core; a second intra-op thread per worker only adds contention.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
