"""Test-wide settings: one torch thread (small models run no slower and a core stays free)."""

import torch

torch.set_num_threads(1)
