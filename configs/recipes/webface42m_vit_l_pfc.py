r"""WebFace42M, ViT-L, CosFace, Partial FC 0.3: insightface's wf42m_pfc03_40epoch_64gpu_vit_l.

  python train.py --config configs/recipes/webface42m_vit_l_pfc.py:/data/WebFace42M \
      --workdir /runs/webface42m_vit_l_pfc

Backbone ``vit_l_dp005_mask_005`` (768 wide, 24 deep; drop path 0.05, token masking 0.1,
what its 0.05 masks: :mod:`margins.models.vit`); insightface reports IJB-C TAR@FAR=1e-4
98.00 (25.3 GFLOPs). Shared settings, and ``--config.micro_batches`` on fewer devices:
:func:`margins.recipes.webface42m_vit`.
"""

from margins import recipes


def get_config(arg=None):
  return recipes.webface42m_vit(arg, model="vit_l", drop_path_rate=0.05, mask_ratio=0.1)
