"""Semantic segmentation: a ViT encoder initialised from MAE weights (or from scratch) with a UPerNet or
linear head, trained on image / mask pairs; mIoU, mAcc and aAcc on data.val.

    accelerate launch mae/segment.py recipe=segment_ade20k_vit_base model.init=runs/vit_base data.train=/data/ADEChallengeData2016 data.val=/data/ADEChallengeData2016
    python mae/segment.py recipe=segment_demo model.init=runs/demo       # Fashion-MNIST scenes, minutes on a CPU
    mae-segment-predict runs/segment_demo photos/ predictions/             # class-id masks and overlays

As the MAE paper's ADE20K transfer (UperNet on blocks 4/6/8/12 of ViT-B through a 4x/2x/1x/0.5x pyramid,
auxiliary FCN head, AdamW with layer-wise lr decay, poly schedule; as mmsegmentation reproduces it), or a
linear head (BatchNorm + 1x1 conv) on a frozen encoder (train.freeze_encoder=true) as a segmentation probe.
Evaluation on data.val every train.eval_every epochs, whole-image or sliding-window (train.eval_mode); the
best model by mIoU is kept in output_dir/checkpoint-best/, per-class IoU in output_dir/eval.json. Data:
an images/ + masks/ folder, the ADE20K release, or fashion-mnist-scenes (mae/data/segmentation.py). Every
key is in recipes/base.yaml.
"""

from mae.cli import command

main, cli = command("segment", __doc__)

if __name__ == "__main__":
    cli()
