"""The CPU bridge's rehearsal of CUDA's device thread for a whole test run. With
SPILL_TEST_BACKWARD_THREAD=1 and this folder first on PYTHONPATH, every Python process of the
run (the tests' own children too, which inherit both) runs each backward on a thread of its
own while the caller waits, as PyTorch's CUDA backward runs on autograd's device thread
(torch_bridge_run.backward_on_another_thread). bench/gpu/README.md says when to run it."""
import os
import sys

if os.environ.get("SPILL_TEST_BACKWARD_THREAD") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import torch_bridge_run
        torch_bridge_run.backward_on_another_thread()
    finally:
        sys.path.pop(0)
