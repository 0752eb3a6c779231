"""One model of torch_train_models captured on meta tensors, then trained for real through the
CPU bridge (spill's simulated device as PyTorch's CPU allocator, no budget), in a process of its
own (the bridge is process-wide). Prints "RESULT <json>": the captured graph's path and the peak
bytes spill measured while the third step ran (parameters, gradients and optimizer state all
exist by then, as in the captured step).

Usage: capture_vs_bridge.py MODEL GRAPH_PATH
"""
from __future__ import annotations

import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train_models import MODELS, _ce, train  # noqa: E402

# The optimizers of torch_train_models.MODELS, as capture() takes them (a factory of params).
OPTIMIZERS = {
    "mlp": functools.partial(torch.optim.Adam, lr=1e-3),
    "cnn": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "gpt": functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
}


def main(name: str, path: str) -> int:
    import spill.torch as st

    torch.set_num_threads(1)
    make_model, _, batch = MODELS[name]
    x, y = batch(0)
    st.capture(make_model, x, loss_fn=_ce, targets=y, optimizer=OPTIMIZERS[name], path=path,
               scale_batch=False)
    st.enable("swap_threshold:128KiB,sim_granularity:64KiB", target="cpu")

    def before(i: int) -> None:
        st.reset_peak_memory_stats()  # after the last reset: step 3's peak

    train(name, 3, before)
    stats = st.memory_stats()
    print("RESULT " + json.dumps({"model": name, "graph": path,
                                  "requested_peak": stats["requested_bytes.all.peak"],
                                  "allocated_peak": stats["allocated_bytes.all.peak"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
