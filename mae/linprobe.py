"""Linear probing: a frozen MAE encoder, BatchNorm (no affine) + a linear classifier on the cls token.

    accelerate launch mae/linprobe.py recipe=linprobe_vit_base model.init=runs/vit_base data.val=...
    python mae/linprobe.py recipe=linprobe_demo model.init=runs/demo     # Fashion-MNIST, minutes on a CPU

As the reference (facebookresearch/mae main_linprobe.py): the encoder gets no gradients and stays in eval
mode; the head is BatchNorm1d(D, affine=False, eps=1e-6) followed by Linear (trunc-normal, std 0.01),
trained with LARS; RandomResizedCrop + flip. Top-1/top-5 on data.val every train.eval_every epochs, best
weights in output_dir/checkpoint-best/. Every key is in recipes/base.yaml; the task itself is mae/tasks/linprobe.py.
"""

from mae.cli import command

main, cli = command("linprobe", __doc__)

if __name__ == "__main__":
    cli()
