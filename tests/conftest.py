import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Subprocesses started by tests (daemons, servers) import the project from here too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    # Tiny models are overhead-bound: a second intra-op thread adds only
    # synchronisation, and on a shared 2-core box oversubscription costs 4x.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok():
    from fedcore.models import load_tokenizer

    return load_tokenizer(None)
