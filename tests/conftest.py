"""Shared pytest fixtures. Tests use tiny randomly initialised timm ViTs; nothing downloads."""

from __future__ import annotations

import os

# Belt and braces: no test may reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

# Tiny ViT geometry used across the suite: 32x32 images, 8x8 patches -> 16 patches + CLS = 17 tokens.
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
