import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ._checkout import use_checkout_packages  # noqa: E402

use_checkout_packages()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests (tiny models; threads only add overhead)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
