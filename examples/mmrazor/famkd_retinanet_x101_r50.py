"""mmrazor 1.x config: FAMKD, RetinaNet ResNeXt-101-64x4d (teacher) -> RetinaNet ResNet-50 (student), COCO, 2x.

Train (mmdet 3.3, mmrazor 1.0, mmcv 2.1 and famkd-losses[mmdet] installed as docs/guides/mmdetection.md
says; COCO under data/coco/):

    # 8 GPUs x 2 images = batch 16, the schedule below
    bash mmrazor/tools/dist_train.sh examples/mmrazor/famkd_retinanet_x101_r50.py 8

Status: ``tests/integrations/test_integration_mmdet.py`` reads this file with ``mmengine.Config.fromfile``, builds
every entry of ``distill_losses`` with our registry and checks the recorder/mapping layout; with mmdet
3.3.0 and mmrazor 1.0.0 installed it also builds the whole model (the X101-64x4d teacher and the R50
student from mmdet's config files, random weights: ``teacher_ckpt`` set to None) and runs one training
step with the optimiser below on two images padded to 128 x 128, on the CPU. It has NOT been trained
on COCO by this project: no schedule, accuracy or multi-GPU run.

Layout (mmrazor's ``ConfigurableDistiller``):

- features: a ``ModuleOutputs`` recorder on ``neck`` records the FPN's output, a tuple of the 5
  levels P3-P7 (256 channels each, strides 8-128), passed whole as ``s_feats`` / ``t_feats``;
- logits: a ``ModuleOutputs`` recorder on ``bbox_head`` records ``RetinaHead.forward``'s
  ``(cls_scores, bbox_preds)``; ``data_idx=0`` is the list of the 5 ``retina_cls`` conv outputs,
  ``(N, 9 * 80, H_l, W_l)`` each (sigmoid head, 9 anchors, 80 classes).

One multi-level ``FAMKDLoss`` takes all five levels at once, as in a plain training loop: the
logits term is normalised by the positions of all levels together (``N * sum_l H_l W_l``). Five
per-level losses fed from a ``bbox_head.retina_cls`` recorder (``record_idx=l``) would each
normalise by their own ``H_l W_l`` and so weigh the small levels up; that is a different loss.

``SingleTeacherDistill``, not ``FpnTeacherDistill``: ``FpnTeacherDistill`` runs only the teacher's
``extract_feat`` (backbone + neck), so its ``bbox_head`` never runs and there are no teacher
logits to record. ``SingleTeacherDistill`` runs the teacher's whole ``loss`` under ``no_grad``
(its head and its loss computation, which is discarded). For feature-only FAMKD, switch to
``FpnTeacherDistill`` and drop the two logits recorders and mappings.
"""

# Importing the module registers our losses in mmengine's root MODELS registry (mmrazor's and
# mmdet's registries are its children, so both find them).
custom_imports = dict(imports=["famkd_losses.integrations.mmdet"], allow_failed_imports=False)

default_scope = "mmdet"

teacher_ckpt = "https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_x101_64x4d_fpn_1x_coco/retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth"

num_levels = 5  # P3-P7
fpn_channels = 256  # student and teacher FPN width: no align conv needed (identity)
num_classes = 80

model = dict(
    _scope_="mmrazor",
    type="SingleTeacherDistill",
    architecture=dict(cfg_path="mmdet::retinanet/retinanet_r50_fpn_2x_coco.py", pretrained=False),
    teacher=dict(cfg_path="mmdet::retinanet/retinanet_x101-64x4d_fpn_1x_coco.py", pretrained=False),
    teacher_ckpt=teacher_ckpt,
    distiller=dict(
        type="ConfigurableDistiller",
        student_recorders=dict(
            fpn=dict(type="ModuleOutputs", source="neck"),
            cls=dict(type="ModuleOutputs", source="bbox_head"),
        ),
        teacher_recorders=dict(
            fpn=dict(type="ModuleOutputs", source="neck"),
            cls=dict(type="ModuleOutputs", source="bbox_head"),
        ),
        distill_losses=dict(
            # the name must contain "loss" for mmengine to add it to the total
            loss_famkd=dict(
                type="FAMKDLoss",
                student_channels=[fpn_channels] * num_levels,
                teacher_channels=[fpn_channels] * num_levels,
                scales=[1, 2, 4],  # our reading
                mask_mode="topk",  # our reading
                ratio_sp=0.65,
                ratio_ch=0.5,
                tau=0.5,
                alpha=2e-5,  # MGD's one-stage weight (sum over C, H, W, divided by N)
                head="sigmoid",  # RetinaNet's focal-loss head
                temperature=1.0,
                beta=1.0,  # our reading
                num_classes=num_classes,
            ),
        ),
        loss_forward_mappings=dict(
            loss_famkd=dict(
                s_feats=dict(from_student=True, recorder="fpn"),
                t_feats=dict(from_student=False, recorder="fpn"),
                s_logits=dict(from_student=True, recorder="cls", data_idx=0),
                t_logits=dict(from_student=False, recorder="cls", data_idx=0),
            ),
        ),
    ),
)

find_unused_parameters = True

# ---- data: mmdet's coco_detection.py ---------------------------------------------------------
dataset_type = "CocoDataset"
data_root = "data/coco/"
backend_args = None

train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=2,  # per GPU: 8 GPUs x 2 = 16
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=True),
    batch_sampler=dict(type="AspectRatioBatchSampler"),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file="annotations/instances_train2017.json",
        data_prefix=dict(img="train2017/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=backend_args,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file="annotations/instances_val2017.json",
        data_prefix=dict(img="val2017/"),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(
    type="CocoMetric",
    ann_file=data_root + "annotations/instances_val2017.json",
    metric="bbox",
    format_only=False,
    backend_args=backend_args,
)
test_evaluator = val_evaluator

# ---- schedule: 2x (24 epochs), SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 16 ---------
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=24, val_interval=1)
val_cfg = dict(type="mmrazor.SingleTeacherDistillValLoop")  # evaluates the student and the teacher
test_cfg = dict(type="TestLoop")

param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=24, by_epoch=True, milestones=[16, 22], gamma=0.1),
]
# The FAMKD module's align convs (none here: 256 -> 256), generators and fusion weights are
# parameters of the distiller, so this optimiser trains them with the student.
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0001),
)
auto_scale_lr = dict(enable=False, base_batch_size=16)

# ---- runtime: mmdet's default_runtime.py --------------------------------------------------------
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=1),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=True)
log_level = "INFO"
load_from = None
resume = False
