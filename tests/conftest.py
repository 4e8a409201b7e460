import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Keep tests off the network and single-threaded enough to share 2 cores with Ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

GOLDEN = Path(__file__).parent / "golden"
TINY_VIT = dict(embed_dim=96, depth=2, num_heads=3)  # the architecture of golden/tiny_dino_vit.pth


@pytest.fixture(scope="session")
def golden():
    return dict(np.load(GOLDEN / "golden_pipeline.npz"))


@pytest.fixture(scope="session")
def golden_backbone():
    return dict(np.load(GOLDEN / "golden_backbone.npz"))


def golden_head(golden):
    """The golden stage-1 head weights, stored under the official keys, in a Stage1Head."""
    from scosparc_core import Stage1Head

    head = Stage1Head(768)
    head.load_state_dict(
        {k.removeprefix("head.encoder_attn."): torch.from_numpy(v) for k, v in golden.items() if k.startswith("head.")}
    )
    return head


def tiny_model(seed: int = 0, **kwargs):
    """A SCoSPARC with the tiny golden ViT (loaded strictly from its DINO-format file) and a seeded head."""
    from scosparc_core import DinoBackbone, SCoSPARC, Stage1Head

    torch.manual_seed(seed)
    backbone = DinoBackbone.create("vit_base_patch8_224", checkpoint=GOLDEN / "tiny_dino_vit.pth", **TINY_VIT)
    return SCoSPARC(backbone, Stage1Head(backbone.embed_dim), **kwargs)


@pytest.fixture(scope="session")
def model():
    return tiny_model()
