"""The yacs defaults: every key of an experiment, each with what it means.

A YAML file in configs/ and `KEY VALUE` pairs on the command line override
these; a key that is not defined here is an error (yacs refuses it), so a
typo never silently falls back to a default.
"""
from yacs.config import CfgNode as CN

_C = CN()

# Folder of one run: config.yaml, metrics.jsonl, log.txt, checkpoints/, tensorboard events.
_C.OUTPUT_DIR = "output/run"

# ---------------------------------------------------------------------------
_C.MODEL = CN()
# auto (cuda if available, else cpu) | cpu | cuda | cuda:N
_C.MODEL.DEVICE = "auto"

_C.MODEL.BACKBONE = CN()
# convnet (small CPU net for 32 px Glyphs) | resnet18 | resnet50 | bninception | timm:<timm model name>
# (any model of the timm library, e.g. timm:vit_small_patch16_224.dino, timm:convnext_tiny; needs the extra
# `pip install -e '.[timm]'`; README, Backbones), or any name registered in
# xbm.modeling.backbones.BACKBONE_REGISTRY (README, Extending xbm)
_C.MODEL.BACKBONE.NAME = "convnet"
# "" = random init; "imagenet" = the standard ImageNet weights of resnet18/50 and bninception (torch hub
# cache, downloaded only when this is set); "hub" = a timm model's own pretrained weights, read from the
# local Hugging Face cache only (MODEL.BACKBONE.TIMM.HUB_DOWNLOAD allows a download); or a path to a state
# dict file: .pth / .pt / .bin (torch.save) or .safetensors, optionally wrapped in "state_dict" or "model"
# and with a "module." prefix
_C.MODEL.BACKBONE.PRETRAINED = ""
# Global pooling of the features: "" = the backbone's own (avg for convnet, resnet*, bninception; for a timm
# model its default global pool: the class token for a ViT, the average for ConvNeXt). xbm's backbones:
# avg | max | avgmax (sum of both); timm models: any global_pool value the model takes (token, avg, max,
# avgmax, map, ...)
_C.MODEL.BACKBONE.POOLING = ""
# Stride of the last ResNet stage: 2 (torchvision) or 1 (a larger final feature map)
_C.MODEL.BACKBONE.LAST_STRIDE = 2
# Freeze BatchNorm statistics and affine parameters of the backbone (eval mode during training)
_C.MODEL.BACKBONE.FROZEN_BN = False
# ResNets: the ReLU after the stem's conv1 + bn1. False reproduces the official XBM ResNet, whose forward
# goes bn1 -> maxpool with no ReLU (research-xbm ret_benchmark/modeling/backbone/resnet.py:129-132@223ecdc)
_C.MODEL.BACKBONE.STEM_RELU = True
# Channel widths of the convnet's stages (two conv-BN-ReLU each, 2x downsampling between stages)
_C.MODEL.BACKBONE.CONVNET_WIDTHS = (32, 64, 128, 256)

# timm backbones (MODEL.BACKBONE.NAME timm:<name>; xbm/modeling/backbones/timm_backbone.py). Each key is
# refused with another backbone unless it keeps its default.
_C.MODEL.BACKBONE.TIMM = CN()
# Extra keyword arguments of timm.create_model, set in a YAML file as a mapping: architecture changes
# (patch_size, depth, embed_dim, num_heads: the tiny ViT of configs/glyphs_vit_baseline.yaml) or
# regularisation (drop_path_rate). Any key is accepted here; timm refuses the ones the model does not take.
_C.MODEL.BACKBONE.TIMM.KWARGS = CN(new_allowed=True)
# With MODEL.BACKBONE.PRETRAINED hub: download the weights from the Hugging Face hub when the local cache
# lacks them (off: a missing file stops the run with the repository and cache path to fill)
_C.MODEL.BACKBONE.TIMM.HUB_DOWNLOAD = False
# Freeze the patch embedding (no gradient, no update), as Hyp-ViT does (htdt/hyp_metric); ViT-style models only
_C.MODEL.BACKBONE.TIMM.FREEZE_PATCH_EMBED = False
# Activation (gradient) checkpointing of the backbone's blocks: recompute activations in backward to
# save memory (timm's set_grad_checkpointing); the result is the same, a step costs about a third more
_C.MODEL.BACKBONE.TIMM.GRAD_CHECKPOINTING = False
# Fused attention (torch's scaled_dot_product_attention, timm's default) in every attention layer that
# has the switch; False computes softmax(QK^T)V step by step (same values up to rounding, more memory)
_C.MODEL.BACKBONE.TIMM.FUSED_ATTN = True

_C.MODEL.HEAD = CN()
# Embedding width: a linear layer on the pooled features, then L2 normalisation; 0 = no projection (the
# pooled features themselves, L2-normalised: 384-d for a ViT-S, as Hyp-ViT and SEE report)
_C.MODEL.HEAD.DIM = 128
# Initialisation of the head's linear layer: pytorch (nn.Linear's default) | kaiming_fan_out (the official
# XBM head: kaiming_normal_ weights in fan_out mode, zero bias; research-xbm
# ret_benchmark/utils/init_methods.py:7-9@223ecdc)
_C.MODEL.HEAD.INIT = "pytorch"

# ---------------------------------------------------------------------------
_C.DATA = CN()
# glyphs | sop | inshop | deepfashion2 | cub200 | cars196 | vehicleid | list, or any name registered in
# xbm.data.datasets.DATASET_REGISTRY (README, Extending xbm)
_C.DATA.NAME = "glyphs"
# Folder holding the dataset as downloaded (Glyphs: generated here on first use)
_C.DATA.ROOT = "datasets/glyphs"
# Images per training batch of one process (= classes x DATA.NUM_INSTANCES); torchrun: global batch = this x processes
_C.DATA.BATCH_SIZE = 16
# Images per class in a training batch (the m of the m-per-class sampler)
_C.DATA.NUM_INSTANCES = 4
# How a batch's classes are drawn: uniform (each epoch a random permutation of the classes: every class
# equally often) | official (research-xbm's RandomIdentitySampler: classes drawn in proportion to their
# remaining chunks of DATA.NUM_INSTANCES images, so large classes more often; random_identity_sampler.py:46-86@223ecdc)
_C.DATA.SAMPLER = "uniform"
# DataLoader worker processes (0 = load in the main process)
_C.DATA.NUM_WORKERS = 0
# Keep the workers of the evaluation loaders alive between evaluations (with NUM_WORKERS > 0):
# re-forking them costs seconds per evaluation on large datasets; the training loader is one
# endless iterator and keeps its workers anyway
_C.DATA.PERSISTENT_WORKERS = True
# Batches each worker prepares ahead (with NUM_WORKERS > 0); 2 is PyTorch's default and hides
# the decoding jitter of JPEG datasets without holding many batches in host memory
_C.DATA.PREFETCH_FACTOR = 2
# Send images to the device as uint8 pixels (4x fewer bytes over PCIe) and convert them to the
# backbone's input convention on the device; off by default: on the CPU it only moves the same
# arithmetic, and the result is the same either way
_C.DATA.UINT8_TRANSFER = False
# An image that cannot be decoded: error (stop, naming it) | skip (use another image of its class, counted in the log)
_C.DATA.BAD_IMAGES = "error"
# Fraction of the training classes held out (class-disjoint) as a validation split for model
# selection (checkpoints/best.pth); 0 = none, report the last iteration
_C.DATA.VAL_FRACTION = 0.0

_C.DATA.GLYPHS = CN()
# A code point becomes a class when at least this many fonts draw it
_C.DATA.GLYPHS.MIN_FONTS = 8
# Side of the rendered square glyph images, in pixels
_C.DATA.GLYPHS.IMAGE_SIZE = 32

# ---------------------------------------------------------------------------
_C.INPUT = CN()
# Side of the square network input (training crop and test centre crop); Glyphs: the image size.
# 0 = the backbone's pretrained input size (a timm model's data config, e.g. 224; 518 for DINOv2). A ViT
# built for another size interpolates its position embedding to this one
_C.INPUT.IMAGE_SIZE = 32
# Shorter side after the first resize (natural images only; test: resize then centre crop). 0 = the
# backbone's test resize, floor(IMAGE_SIZE / crop_pct) with the crop_pct of a timm model's data config
# (0.875 otherwise: 256 for 224)
_C.INPUT.RESIZE = 256
# Interpolation of the resizes and of the random resized crop: "" = the backbone's (a timm model's data
# config, bicubic for most ViTs; bilinear for xbm's backbones) | bilinear | bicubic
_C.INPUT.INTERPOLATION = ""
# Area range of RandomResizedCrop at training time (natural images only)
_C.INPUT.CROP_SCALE = (0.16, 1.0)
# Random horizontal flips at training time (natural images only; never for Glyphs)
_C.INPUT.HFLIP = True

# ---------------------------------------------------------------------------
_C.XBM = CN()
# Use the cross-batch memory (False = in-batch loss only, the baseline)
_C.XBM.ENABLE = False
# Number of embeddings the memory holds (SOP in the paper: 55,000); at least the global batch
# (DATA.BATCH_SIZE x processes), or -1 for one entry per training image (XBN on DeepFashion2)
_C.XBM.SIZE = 4096
# Iteration from which the memory loss is added (the memory is filled from the start)
_C.XBM.START_ITERATION = 100
# Weight of the loss against the memory (total = LOSS.INBATCH_WEIGHT x in-batch + this x memory)
_C.XBM.WEIGHT = 1.0
# Storage type of the memory: float32 | float16 | bfloat16 (half the bytes, slightly rounded)
_C.XBM.DTYPE = "float32"
# When batches start entering the memory: iteration_0 (every batch from the first step, so the
# memory is full when its loss starts) | start_iteration (only from XBM.START_ITERATION on, so the
# memory grows from empty, as the official trainer does: research-xbm
# ret_benchmark/engine/trainer.py:105-106@223ecdc)
_C.XBM.FILL_FROM = "iteration_0"
# Corrections of the memory's drift at the encoder (BENCHMARKS, "Encoder-side drift"), each off at 0;
# each combines with XBM.ADAPT and with the others, except age weighting with a refresh (an entry's age
# counts from its enqueue, which a refresh does not reset).
# A momentum key encoder (MoCo, He et al. 2020; xbm/memory/key_encoder.py): the memory is filled from an
# exponential moving average of the model (key = m key + (1 - m) model after each step), the loss's anchors
# come from the model itself. One more forward of the batch per step, no gradient. 0: off; e.g. 0.99, 0.999
_C.XBM.KEY_MOMENTUM = 0.0
# Partial refresh (xbm/memory/refresh.py): after each step, this many stored entries are re-embedded by the
# current network (eval mode, test-time transform, no gradient), a cursor sweeping the memory; their images
# are found through the items the memory then tracks (twice its bytes). 0: off
_C.XBM.REFRESH_PER_STEP = 0
# Age weighting (xbm/memory/age_weighting.py): each memory entry's pairs weigh exp(-age / this), the age in
# iterations, normalised to average 1 over the memory. 0: off. LOSS.NAME contrastive or supcon
_C.XBM.AGE_WEIGHT_SCALE = 0.0

_C.XBM.ADAPT = CN()
# Memory adaptation before each step: none (XBM) | xbn (moment matching) | axbn (Kalman) | ema |
# xbn_full (mean and full covariance) | xbn_age (moment matching per age cohort), or any
# name registered in xbm.memory.ADAPTER_REGISTRY (README, Extending xbm)
_C.XBM.ADAPT.NAME = "none"
# Added to the memory's std before dividing (moment matching)
_C.XBM.ADAPT.EPS = 1e-5
# Re-normalise adapted memory entries to unit length (the paper does not)
_C.XBM.ADAPT.RENORMALIZE = False
# AXBN: process noise q of the random-walk Kalman filter
_C.XBM.ADAPT.KALMAN_Q = 1.0
# AXBN: initial state covariance p0
_C.XBM.ADAPT.KALMAN_P0 = 1.0
# AXBN: measurement noise r (divided by the batch size). The gain settles to K with
# r = batch * q * (1 - K) / K^2 (xbm.memory.kalman_r_for_gain): with q = 1 and batch 16, r = 0.01 gives
# K = 0.9994 (AXBN = XBN), 0.163 gives 0.99, 1.98 gives 0.9, 32 gives 0.5, 1440 gives 0.1
_C.XBM.ADAPT.KALMAN_R = 0.01
# AXBN: the Kalman gain and covariance are updated every this many steps (paper: 100 SOP, 10 DF2)
_C.XBM.ADAPT.KALMAN_INTERVAL = 1
# EMA adaptation: momentum of the running moments (0 = XBN)
_C.XBM.ADAPT.EMA_MOMENTUM = 0.1
# xbn_full (xbm/memory/covariance_matching.py): share of the running target covariance kept at each
# step (the rest is the batch's covariance, rank-deficient on its own when the batch is smaller than
# the embedding)
_C.XBM.ADAPT.COVARIANCE_MOMENTUM = 0.9
# xbn_full: weight of its own diagonal in the target covariance (1 = per-dimension only)
_C.XBM.ADAPT.COVARIANCE_SHRINKAGE = 0.1
# xbn_full: ridge added to the memory covariance's eigenvalues before its inverse square root, as a
# fraction of their mean
_C.XBM.ADAPT.COVARIANCE_RIDGE = 0.01
# xbn_age (xbm/memory/cohort_matching.py): age cohorts of the memory, each moment-matched on its own
_C.XBM.ADAPT.AGE_GROUPS = 4

# ---------------------------------------------------------------------------
# Feature drift (the XBM paper's "slow drift"), measured with or without a memory. Called XBM.DRIFT
# before; config files and checkpoints that say XBM.DRIFT are read as DRIFT (xbm/config/rules.py).
_C.DRIFT = CN()
# Measure feature drift on a fixed subset of training images (drift.jsonl, tensorboard)
_C.DRIFT.ENABLE = False
# Iterations between two embeddings of the subset (drift = distance between them)
_C.DRIFT.INTERVAL = 50
# Training images in the fixed subset
_C.DRIFT.NUM_SAMPLES = 256
# The memory's adaptation error (xbm/diagnostics/memory_drift.py): every DRIFT.MEMORY_INTERVAL iterations,
# re-embed a random sample of the items in the memory with the current network (eval mode, test-time
# transform, no gradient) and log the mean cosine between each stored entry (as adapted) and its fresh
# embedding, and between the entry as it was enqueued and the fresh one: how much drift the adaptation
# removes (memory_drift/* in drift.jsonl and tensorboard). Off without a memory; the memory then also keeps
# each entry's training-set index and an un-adapted copy (twice its bytes). Training is unchanged.
_C.DRIFT.MEMORY_PROBE = False
# Iterations between two measurements of the memory probe
_C.DRIFT.MEMORY_INTERVAL = 100
# Memory entries re-embedded per measurement (a fresh random sample each time, seeded by the iteration)
_C.DRIFT.MEMORY_SAMPLES = 256

# ---------------------------------------------------------------------------
_C.LOSS = CN()
# contrastive | multi_similarity | triplet | supcon, or any name registered in xbm.losses.LOSS_REGISTRY
# (README, Extending xbm)
_C.LOSS.NAME = "contrastive"
# Weight of the in-batch loss (XBN's memory-only loss: 0)
_C.LOSS.INBATCH_WEIGHT = 1.0

_C.LOSS.CONTRASTIVE = CN()
# Negatives with cosine similarity above this margin are penalised
_C.LOSS.CONTRASTIVE.MARGIN = 0.5
# batch (official: summed pair losses / batch size) | pairs (mean over active pairs)
_C.LOSS.CONTRASTIVE.REDUCTION = "batch"

_C.LOSS.MS = CN()
# Multi-Similarity: positive scale alpha
_C.LOSS.MS.ALPHA = 2.0
# Multi-Similarity: negative scale beta
_C.LOSS.MS.BETA = 40.0
# Multi-Similarity: similarity threshold lambda
_C.LOSS.MS.BASE = 0.5
# Multi-Similarity: hard-mining margin epsilon
_C.LOSS.MS.MARGIN = 0.1
# Multi-Similarity: mine hard pairs before weighting
_C.LOSS.MS.HARD_MINING = True

_C.LOSS.TRIPLET = CN()
# Triplet: margin on cosine similarity
_C.LOSS.TRIPLET.MARGIN = 0.1
# Triplet: which triplets: all | semihard | hard
_C.LOSS.TRIPLET.MINING = "semihard"

_C.LOSS.SUPCON = CN()
# Supervised contrastive: temperature
_C.LOSS.SUPCON.TEMPERATURE = 0.1
# Pair-margin miner: positives farther than this (normalised Euclidean distance) are kept
_C.LOSS.SUPCON.POS_MARGIN = 0.2
# Pair-margin miner: negatives closer than this are kept
_C.LOSS.SUPCON.NEG_MARGIN = 0.8
# Use the pair-margin miner (False = all pairs)
_C.LOSS.SUPCON.MINING = True

# ---------------------------------------------------------------------------
_C.SOLVER = CN()
# adam | adamw | sgd
_C.SOLVER.OPTIMIZER = "adam"
# Learning rate after warm-up (the most sensitive hyper-parameter: scan it on a log grid)
_C.SOLVER.BASE_LR = 3e-4
# Weight decay (L2 for adam/sgd, decoupled for adamw)
_C.SOLVER.WEIGHT_DECAY = 0.0
# No weight decay for biases and norm layers (every parameter of fewer than 2 dimensions) and for the
# backbone's own no_weight_decay() names (a timm ViT: pos_embed, cls_token), as timm, DINO and HIER do
_C.SOLVER.NO_DECAY_NORM_BIAS = False
# Learning rate of the backbone = SOLVER.BASE_LR x this; the head keeps SOLVER.BASE_LR (0.01: the head
# learns 100x faster, as HIER and Proxy-Anchor set it)
_C.SOLVER.BACKBONE_LR_FACTOR = 1.0
# Layer-wise learning-rate decay of the backbone (1 = off): layer l of L gets decay^(L - l) of its rate,
# the layers as timm groups them (timm.optim.param_groups_layer_decay); timm backbones only
_C.SOLVER.LAYER_DECAY = 1.0
# SGD momentum
_C.SOLVER.MOMENTUM = 0.9
# Number of training iterations
_C.SOLVER.MAX_ITERS = 2000
# none | step (x GAMMA at each of STEPS) | cosine (to 0 at MAX_ITERS) | plateau (x SOLVER.PLATEAU.FACTOR
# when the evaluations stop improving, as the official XBM code does; see SOLVER.PLATEAU)
_C.SOLVER.SCHEDULER = "none"
# Iterations at which the step scheduler multiplies the learning rate by GAMMA
_C.SOLVER.STEPS = ()
# Factor of the step scheduler
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.PLATEAU = CN()
# The reduce-on-plateau schedule (SOLVER.SCHEDULER plateau), stepped at every evaluation (TEST.EVAL_PERIOD);
# the defaults are the official code's (research-xbm ret_benchmark/solver/build.py:15-23@223ecdc).
# Evaluation task whose score drives it: val (the validation split, DATA.VAL_FRACTION > 0) | test (what the
# official code does: the learning rate then depends on the test set, so test numbers are optimistic)
_C.SOLVER.PLATEAU.SPLIT = "val"
# Metric of that task (higher is better); the official code steps on test R@1
_C.SOLVER.PLATEAU.METRIC = "R@1"
# Multiplier of the learning rate at each reduction
_C.SOLVER.PLATEAU.FACTOR = 0.1
# Evaluations without improvement tolerated before a reduction
_C.SOLVER.PLATEAU.PATIENCE = 4
# Relative improvement that counts: score > best x (1 + THRESHOLD)
_C.SOLVER.PLATEAU.THRESHOLD = 0.001
# Evaluations after a reduction during which no bad evaluation is counted
_C.SOLVER.PLATEAU.COOLDOWN = 2
# Lowest learning rate, as a fraction of SOLVER.BASE_LR (official: BASE_LR / (10 x 2) = 0.05)
_C.SOLVER.PLATEAU.MIN_FACTOR = 0.05
# Linear learning-rate warm-up from 0 over this many iterations
_C.SOLVER.WARMUP_ITERS = 0
# Iterations at the start that train only the embedding head (the XBN paper's warm-up epochs)
_C.SOLVER.HEAD_WARMUP_ITERS = 0
# Mixed precision (autocast) of the network: none | fp16 (CUDA, with a gradient scaler) | bf16
# (CUDA devices with bf16 support, or the CPU). Losses and the memory stay float32. On a CPU
# without native bfloat16 (no AVX512-BF16 / AMX) bf16 is emulated, ~20x slower: a warning, and
# evaluation in float32
_C.SOLVER.AMP = "none"
# A step whose loss or embeddings are not finite (an fp16 forward overflow) is skipped and
# counted, as GradScaler skips a step whose gradients overflow; this many skipped steps in a row
# stop the run (1 = stop at the first). 10: an overflow is rare and isolated, a diverged run
# stays non-finite
_C.SOLVER.MAX_NONFINITE_STEPS = 10
# Clip the gradient norm to this value (0 = no clipping)
_C.SOLVER.GRAD_CLIP = 0.0
# Save checkpoints/last.pth every this many iterations (and at the end)
_C.SOLVER.CHECKPOINT_PERIOD = 1000
# Also keep this many numbered checkpoints (checkpoints/iter_NNNNNNN.pth), the newest; 0 = only last.pth
_C.SOLVER.KEEP_CHECKPOINTS = 0
# Continue a run: "" (start fresh) | auto (OUTPUT_DIR/checkpoints/last.pth if it exists) | a checkpoint path;
# the --resume flag of train_net.py overrides it
_C.SOLVER.RESUME = ""
# Seed of python, numpy, torch and the sampler
_C.SOLVER.SEED = 0
# Log the losses every this many iterations
_C.SOLVER.LOG_PERIOD = 50
# On those logging steps, also log the norm of each loss term's gradient with respect to the
# embeddings (grad/inbatch_norm, grad/memory_norm, grad/memory_over_inbatch): how much the memory
# term outweighs the in-batch term. Costs one extra backward through the losses (not the network)
# on logging steps; the training itself is unchanged bit for bit.
_C.SOLVER.LOG_GRAD_NORMS = False

# ---------------------------------------------------------------------------
# Speed switches. None changes what is computed beyond floating-point rounding; none has an
# effect on the CPU except CHANNELS_LAST and COMPILE.
_C.PERF = CN()
# torch.backends.cudnn.benchmark: time the convolution algorithms once per input shape and keep
# the fastest. On: training crops have one fixed size, so the search is paid once (the torchvision
# and timm reference scripts do the same)
_C.PERF.CUDNN_BENCHMARK = True
# TensorFloat-32 matrix products and convolutions on Ampere and newer GPUs (8x the float32
# throughput, 10-bit mantissa inputs, float32 accumulation). On: embeddings are L2-normalised
# and compared by cosine, far coarser than TF32's rounding
_C.PERF.TF32 = True
# channels_last memory format for the convolutional backbones (tensor cores read NHWC without a
# transpose). Off by default like torchvision's and timm's scripts: it pays with AMP on tensor-core
# GPUs (the GPU check measures it) and can be slower in float32 or on the CPU
_C.PERF.CHANNELS_LAST = False
# torch.compile the network with this backend: "" (off) | inductor | any name in
# torch._dynamo.list_backends(). Off by default: compiling costs one to several minutes at the
# start of every run (and again after a resume)
_C.PERF.COMPILE = ""
# torch.use_deterministic_algorithms(True, warn_only=True), cudnn.benchmark off and a fixed cuBLAS
# workspace: a CUDA run and its resume give the same bits (slower; an op with no deterministic CUDA
# kernel warns, naming itself). Off: results then vary in the last bits
_C.PERF.DETERMINISTIC = False

# ---------------------------------------------------------------------------
_C.TEST = CN()
# Evaluate every this many iterations (and at the end); 0 = only at the end
_C.TEST.EVAL_PERIOD = 500
# Images per forward pass when computing test embeddings
_C.TEST.BATCH_SIZE = 256
# Recall@K list; empty = the dataset's own list (SOP 1/10/100/1000, In-Shop 1/10/20/..., ...)
_C.TEST.RECALL_KS = ()
# Metric of the validation split that picks checkpoints/best.pth (with DATA.VAL_FRACTION > 0)
_C.TEST.SELECT_METRIC = "R@1"
# k-NN search: auto (the fastest available on the run's device: faiss-gpu or torch on CUDA,
# faiss on the CPU, torch when faiss is not installed) | faiss | torch
_C.TEST.KNN_BACKEND = "auto"
# Also report the evaluation with the best test TEST.SELECT_METRIC, as the official XBM code logs
# ("Best iteration", research-xbm ret_benchmark/engine/trainer.py:87-90,164@223ecdc, chosen there by test
# MAP@R). A number chosen on the test set is optimistic: it is written only to log.txt and to
# best_on_test_OPTIMISTIC.json, each labelled so; the last iteration and the validation-chosen best.pth stay
# the reported results.
_C.TEST.REPORT_BEST_ON_TEST = False


def get_cfg() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()
