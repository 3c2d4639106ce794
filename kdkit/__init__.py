"""kdkit: knowledge distillation for large language models."""

import os

__version__ = "0.1.0"

# oneDNN (PyTorch's CPU GEMMs) keeps a compiled kernel per matrix shape, 1,024 of them by default. Training
# batches of like lengths (train.group_by_length) and chunked losses meet a new shape nearly every step; with
# the default cache a quickstart's step slowed from 858 to 645 tokens/s over 240 steps as its resident
# memory grew from 3.4 to 5.0 GB; with 16 kernels kept it held 897 → 824 tokens/s at 3.6 GB
# (benchmarks/quickstart_step.py). Read once, when oneDNN first builds a kernel: set here, before any torch
# op of a kdkit process; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
