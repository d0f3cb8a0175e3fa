"""MAE pretraining (He et al. 2022): a ViT encoder learns, without labels, by reconstructing the 75% of
each image's patches that it does not see; checkpoints, metrics and reconstruction figures go to output_dir.

    accelerate launch mae/pretrain.py recipe=vit_base data.train='shards/train-{000000..001023}.tar'
    python mae/pretrain.py recipe=demo                       # Fashion-MNIST, minutes on a laptop CPU
    python mae/pretrain.py recipe=demo model.init=runs/demo data.train=/data/my_images   # continue on yours

model.init starts from released or earlier weights (a run, a reference .pth, a Hugging Face ViTMAE
directory, a timm export): the decoder too when the source has one, adapted to the run's channels, image and
patch size; optimizer, schedule and step start fresh.

Every key is in recipes/base.yaml; re-running the same command in the same output_dir resumes.
"""

from mae.cli import command

main, cli = command("pretrain", __doc__)

if __name__ == "__main__":
    cli()
