r"""WebFace42M, ViT-T, CosFace, Partial FC 0.3: insightface's wf42m_pfc03_40epoch_64gpu_vit_t.

  python train.py --config configs/recipes/webface42m_vit_t_pfc.py:/data/WebFace42M \
      --workdir /runs/webface42m_vit_t_pfc

Backbone ``vit_t_dp005_mask0`` (256 wide, 12 deep; drop path 0.05, token masking 0); insightface
reports IJB-C TAR@FAR=1e-4 97.31 (1.5 GFLOPs). Shared settings, and ``--config.micro_batches`` on
fewer devices: :func:`margins.recipes.webface42m_vit`.
"""

from margins import recipes


def get_config(arg=None):
  return recipes.webface42m_vit(arg, model="vit_t", drop_path_rate=0.05, mask_ratio=0.0)
