"""AdaFace IR-101 on MS1MV2: the reference's released training recipe.

Batch 512, SGD lr 0.1 (momentum 0.9, weight decay 5e-4), x0.1 at epochs 12,
20 and 24 of 26, AdaFace m=0.4, h=0.333, s=64, t_alpha=0.01, 85,742
identities, and the three AdaFace augmentations (crop, low resolution,
photometric) each on a coin of 0.2, as the reference's scripts set them.
Point data.root at the extracted MS1MV2 image folders:

  python train.py --config configs/adaface_ir101.py \
      --config.data.root=/data/ms1mv2/imgs --workdir runs/ir101_ms1mv2

`--config configs/adaface_ir101.py:ir_50` trains the IR-50 variant.
"""

from configs import common


def get_config(arch: str = "ir_101"):
  config = common.get_base_config()
  config.model.name = arch
  config.data.kind = "image_folder"
  config.data.alignment = "none"  # MS1MV2 ships aligned 112x112 crops.
  config.data.worker_count = 16
  config.data.crop_augmentation_prob = 0.2
  config.data.low_res_augmentation_prob = 0.2
  config.data.photometric_augmentation_prob = 0.2

  config.logging.log_every_steps = 100
  config.checkpoint.every_steps = 2000
  return config
