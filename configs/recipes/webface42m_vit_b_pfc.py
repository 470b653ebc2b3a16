r"""WebFace42M, ViT-B (512 wide, 24 deep), CosFace (s=64, m=0.4), Partial FC 0.3, AdamW:
insightface's wf42m_pfc03_40epoch_64gpu_vit_b.

  python train.py --config configs/recipes/webface42m_vit_b_pfc.py:/data/WebFace42M \
      --workdir /runs/webface42m_vit_b_pfc

WebFace42M for 40 epochs of global batches of 24,576 (384 images on each of 64 GPUs; 69,120 steps),
the first 4 epochs warming up linearly; AdamW lr 1e-3, weight decay 0.1, polynomial decay. Backbone
insightface's ``vit_b_dp005_mask_005``: drop path 0.05, token masking 0.05. insightface reports
IJB-C TAR@FAR=1e-4 97.90 (11.4 GFLOPs). On 8 devices, ``--config.micro_batches=8`` keeps the global
batch (8 micro-batches of 384 images per device and step). See :mod:`margins.recipes` for the shared
settings and :mod:`configs.recipes.webface42m_r100_pfc` for several hosts;
``...:/data/WebFace42M,quick`` is a seconds-long smoke run (ViT-T, 32x32).
"""

from margins import recipes


def get_config(arg=None):
  return recipes.webface42m_vit(arg, model="vit_b", drop_path_rate=0.05, mask_ratio=0.05)
