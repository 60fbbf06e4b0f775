import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ._checkout import use_checkout_packages  # noqa: E402

use_checkout_packages()
