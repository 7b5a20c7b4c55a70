"""pytest setup shared by the CPU suite.

- Tests import the package from this working tree, not from some other installed copy.
- One fresh base seed per session (``DEEP_EP_TEST_SEED`` to repeat a run), printed in the
  header and in every failure message.
- Spawned test processes run single-threaded and talk over the loopback interface.
"""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (_TESTS_DIR, _REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Set before torch is imported anywhere, so spawned processes inherit them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.path.exists("/sys/class/net/lo"):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

from dist_utils import base_seed  # noqa: E402


def pytest_report_header(config):
    return f"deep_ep tests: DEEP_EP_TEST_SEED={base_seed()} (export it to repeat this run)"
