"""Object detection and instance segmentation: Mask R-CNN on a ViT encoder initialised from MAE weights (or from
scratch), as ViTDet (Li, Mao, Girshick, He 2022); COCO box and mask AP on data.val.

    accelerate launch mae/detect.py recipe=detect_coco_vit_base model.init=runs/vit_base data.train=/data/coco data.val=/data/coco
    python mae/detect.py recipe=detect_demo model.init=runs/demo       # Fashion-MNIST scenes, minutes on a CPU
    mae-detect-predict runs/detect_demo instances/ detections/           # predictions.json and overlays

The encoder becomes ViTDet's backbone (window attention with four global blocks, relative position bias, the
simple feature pyramid; mae/models/detection.py) under torchvision's Mask R-CNN, trained with layer-wise lr decay
and drop path on COCO instances (a JSON file, annotations.json + images/, or the COCO 2017 release; or the built-in
fashion-mnist-instances) with large-scale jitter. Evaluation on data.val every train.eval_every epochs by
pycocotools' COCOeval: box_ap, box_ap50, box_ap75 and mask_ap in metrics.jsonl, AP per category in
output_dir/eval.json, the best model by box AP in output_dir/checkpoint-best/. Every key is in recipes/base.yaml; the task itself is mae/tasks/detect.py.
"""

from mae.cli import command

main, cli = command("detect", __doc__)

if __name__ == "__main__":
    cli()
