"""Fine-tuning: a ViT classifier initialised from MAE weights (or from scratch), trained end to end.

    accelerate launch mae/finetune.py recipe=finetune_vit_base model.init=runs/vit_base data.val=...
    python mae/finetune.py recipe=finetune_demo model.init=runs/demo     # Fashion-MNIST, minutes on a CPU

As the reference fine-tuning (facebookresearch/mae main_finetune.py): layer-wise lr decay, drop path,
Mixup/CutMix with soft-target cross-entropy, label smoothing, RandAugment and random erasing (all timm),
global average pooling or the cls token. Top-1/top-5 on data.val every train.eval_every epochs; the
best model so far is kept in output_dir/checkpoint-best/. Every key is in recipes/base.yaml; the task itself is mae/tasks/finetune.py.
"""

from mae.cli import command

main, cli = command("finetune", __doc__)

if __name__ == "__main__":
    cli()
