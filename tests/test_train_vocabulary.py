"""A GHN trained from scratch embeds every op type of today's vocabulary (and so can train on every sampled net)."""

from __future__ import annotations

import torch

from ghnq_deploy.ghn.graph import PRIMITIVES
from ghnq_deploy.ghn.model import GHNConfig
from ghnq_deploy.ghn.train import TrainConfig, make_ghn


def test_fresh_ghn_knows_every_primitive_and_embeds_new_ops():
    ghn = make_ghn(TrainConfig(out_dir="unused"))
    assert ghn.config.num_primitives == len(PRIMITIVES)
    assert ghn.op_embedding.num_embeddings == len(PRIMITIVES)
    # an old checkpoint's config (no field) still reads as the legacy vocabulary
    assert GHNConfig.from_checkpoint({}).num_primitives < len(PRIMITIVES)
    assert ghn.op_embedding(torch.arange(len(PRIMITIVES))).shape == (len(PRIMITIVES), ghn.config.hid)
