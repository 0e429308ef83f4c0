"""Write a freshly initialised GHN-Q checkpoint (seed 0, today's op vocabulary), with or without
weight standardisation, so that `ghnq-deploy train --init-from FILE` starts both arms of the
ablation from the same initial weights (the field adds no parameters)."""

import sys

import torch

from ghnq_deploy.ghn.graph import PRIMITIVES
from ghnq_deploy.ghn.model import GHNQ, GHNConfig
from ghnq_deploy.io import atomic_torch_save

out, ws = sys.argv[1], sys.argv[2] == "ws"
torch.manual_seed(0)  # as ghn/train.py's make_ghn does for a fresh run with --seed 0
ghn = GHNQ(GHNConfig(num_primitives=len(PRIMITIVES), weight_standardization=ws))
atomic_torch_save(out, ghn.checkpoint(note="fresh initialisation, seed 0"))
