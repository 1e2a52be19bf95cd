"""The config schema shared by every stage (bagging, training, evaluation).

Each experiment config (``r18_r50w2.py`` ...) starts from ``base_config()`` and changes
what differs. Values are the released BINGO hyper-parameters (docs/method.md) unless noted.
Override any key on the command line: ``--config.train.batch_size=512``.
"""

import ml_collections


# size: one listing of the whole schema, section by section, each key with its comment, so
# that every key and its default are found in one place.
def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # ---- data: what images, read how (bingo_jax/data/sources/) ----
  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'          # 'tfds' | 'folder' | 'filelist' | 'fashion_mnist'
  config.data.name = 'imagenet2012'    # TFDS name (source='tfds')
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
  config.data.path = ml_collections.FieldReference(None, field_type=str)  # folder root / file list
  # (may contain '{split}'); source='fashion_mnist': directory of the .gz files
  config.data.root = ml_collections.FieldReference(None, field_type=str)  # file list: base dir
  config.data.image_key = ml_collections.FieldReference(None, field_type=str)  # TFDS feature
  config.data.label_key = ml_collections.FieldReference(None, field_type=str)  # default 'label'
  config.data.train_split = 'train'    # the split that is bagged and distilled on
  config.data.eval_split = 'validation'
  config.data.image_size = 224         # training crop; evaluation centre-crops 224/256 of resize
  config.data.in_memory = False        # hold a small data set in host memory
  config.data.num_parallel_calls = -1  # tf.data.AUTOTUNE
  # Where the MoCo v2 views are drawn (docs/data.md): 'device' (in the jitted step, from
  # images decoded once per anchor/positive) | 'host' (tf.data, the reference path).
  config.data.augment_on = 'device'
  config.data.canvas_size = 512        # device mode: host canvas side (ImageNet fits unresized)
  config.data.on_device = 'auto'       # hold a small decoded data set on the devices:
                                       # 'auto' (if <= on_device_max_mb) | 'always' | 'never'
  config.data.on_device_max_mb = 2048
  config.data.on_bad_image = 'error'   # an undecodable image: 'error' stops naming the file,
                                       # 'skip' reads the next good image instead (counted)

  # ---- teacher: a converted model file (bingo-convert) ----
  config.teacher = ml_collections.ConfigDict()
  config.teacher.path = ml_collections.FieldReference(None, field_type=str)
  # Training-mode statistics on the groups of a random permutation of the global batch, as
  # released (docs/training.md, "The teacher's batch shuffle"): 'shuffle_stats' sums each
  # group's statistics where its images are | 'shuffle' (released) moves the images;
  # or 'frozen' (stored running statistics).
  config.teacher.bn_mode = 'shuffle_stats'
  config.teacher.bn_group_size = 32    # released: 256 images over 8 GPUs

  # ---- student: create_model keyword arguments ----
  config.student = ml_collections.ConfigDict()
  config.student.arch = 'resnet18'
  config.student.head = 'moco'
  config.student.head_hidden_dim = 2048
  config.student.head_output_dim = 128
  config.student.base_width = ml_collections.FieldReference(None, field_type=int)
  config.student.stem = 'imagenet'
  config.student.bn_group_size = ml_collections.FieldReference(32, field_type=int)  # None: global
  # A model file to start a fresh run from (bingo_jax/run/warm_start.py); None: random init.
  config.student.init_from = ml_collections.FieldReference(None, field_type=str)

  # ---- bags: bingo_jax/bagging.py ----
  config.bags = ml_collections.ConfigDict()
  config.bags.path = ml_collections.FieldReference(None, field_type=str)
  config.bags.method = 'knn'           # 'knn' | 'approx' | 'jax' | 'kmeans' | 'labels' |
                                       # 'random-teacher'
  config.bags.k = 5
  # Training's bags: 'file' (config.bags.path) | 'student': kNN in the student's own features,
  # recomputed at epochs 0, N, 2N, ... (N = refresh_every_epochs; Table 8 "student relation",
  # bingo_jax/bags/student_bags.py; bags.method 'knn' or 'jax' searches them)
  config.bags.source = 'file'
  config.bags.refresh_every_epochs = 0
  config.bags.num_clusters = 20000     # kmeans
  config.bags.batch_size = 256         # teacher feature pass, global
  config.bags.shard_size = 65536       # images per feature shard on disk
  config.bags.features_dir = ml_collections.FieldReference(None, field_type=str)  # WORKDIR/features
  config.bags.image_size = ml_collections.FieldReference(None, field_type=int)  # None: data's
  config.bags.query_batch_size = 16384  # kNN queries per search call (jax: per device step)
  config.bags.approx_index = 'IVF{nlist},Flat'  # faiss index_factory; e.g. 'PCA256,IVF{nlist},Flat'
  config.bags.approx_search_parameters = 'nprobe=32'  # or 'efSearch=128' for HNSW
  config.bags.approx_recall_sample = 1000  # anchors checked against exact search
  config.bags.kmeans_iterations = 20
  config.bags.seed = 0
  config.bags.random_teacher = ml_collections.ConfigDict()  # random-teacher without teacher.path
  config.bags.random_teacher.arch = ml_collections.FieldReference(None, field_type=str)
  config.bags.random_teacher.base_width = ml_collections.FieldReference(None, field_type=int)
  config.bags.random_teacher.stem = ml_collections.FieldReference(None, field_type=str)
  config.bags.report_anchors = 8       # rows of the bag report's image grid
  config.bags.report_members = 8       # bag members shown per row

  # ---- train: bingo_jax/train.py ----
  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.batch_size = 256        # global
  config.train.epochs = 200
  config.train.base_lr = 0.03          # at batch 256, scaled linearly
  config.train.lr_schedule = 'cosine_epoch'  # 'cosine_epoch' (released) | 'cosine_step'
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-4
  config.train.temperature = 0.2
  config.train.queue_size = 65536
  config.train.method = 'bingo'        # 'bingo' (distil a teacher) | 'moco' (MoCo v2
  #   pre-training: the teacher is the student's momentum encoder; no teacher/bag files)
  config.train.moco_momentum = 0.999   # moco only: key encoder k = m * k + (1 - m) * q
  # moco only, its objective: 'anchor_only' (plain MoCo v2) | 'bingo' / 'paper_eq8' (positives
  # from config.bags.path: the paper's "teacher relation only", Table 8 row 3; method.md §6)
  config.train.moco_loss = 'anchor_only'
  config.train.loss = 'bingo'          # docs/method.md §6: 'bingo' (released) | 'paper_eq8'
                                       # (the paper's Eq. 8/9: CE(q, k) + CE(p, k)) |
                                       # 'anchor_only' (CE(q, k) only: no bags, no CutMix)
  config.train.own_key_warmup_epochs = 11  # (w_own, w_oth) = (1, 0) for epochs 0..10
  config.train.cutmix = 'batch'        # docs/method.md §3: 'batch' (one box) | 'group' (one
                                       # per BN group, as each released GPU process draws) |
                                       # 'sample' | 'none'
  config.train.cutmix_beta = 2.0
  config.train.compute_dtype = 'float32'  # | 'bfloat16' | 'auto' (bfloat16 on GPU/TPU, float32
                                          # on CPU); parameters etc. stay float32
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3
  config.train.max_steps = ml_collections.FieldReference(None, field_type=int)  # stop early
  # kNN monitor (bingo_jax/run/knn_monitor.py): weighted kNN top-1 of the student's features on
  # fixed labelled subsets every N epochs, to the log and TensorBoard; 0 or no labels: off.
  config.train.monitor_every_epochs = 10
  config.train.monitor_bank_size = 10000   # images of eval.train_split or data.train_split
  config.train.monitor_eval_size = 2000    # images of data.eval_split
  config.train.nan_policy = 'stop'     # a non-finite loss stops the run (docs/reliability.md)
  config.train.allow_config_change = False  # resume a workdir whose config.json differs

  # ---- eval: bingo_jax/evaluate.py ----
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  # The labelled split of the kNN bank / probe's training set; None: data.train_split (STL-10
  # distils on its unlabelled split and evaluates with its labelled 'train' split).
  config.eval.train_split = ml_collections.FieldReference(None, field_type=str)
  config.eval.knn_k = 10
  config.eval.knn_weighted_k = 200
  config.eval.knn_temperature = 0.07
  config.eval.linear_epochs = 100
  config.eval.linear_lr = 30.0         # at batch 256
  config.eval.linear_min_lr = 0.01     # released main_lincls.py: cosine (per epoch) to 0.01
  config.eval.linear_fast_epochs = 100  # fast probe on cached centre-crop features
  config.eval.linear_fast_lr = 10.0    # at batch 256, standardised features (linear.py)
  config.eval.finetune_fraction = 0.01
  config.eval.finetune_epochs = 60
  config.eval.finetune_split_file = ml_collections.FieldReference(None, field_type=str)  # SimCLR
  config.eval.finetune_lr = 1.0        # backbone, at batch 256 (not published)
  config.eval.finetune_classifier_lr_multiplier = 10.0  # paper: new fc at lr 10
  config.eval.finetune_weight_decay = 0.0
  # Write the fine-tuned network (backbone and classifier) as a model file at this path: a
  # supervised network for bagging (paper Table 7; docs/evaluation.md). None: not written.
  config.eval.finetune_export = ml_collections.FieldReference(None, field_type=str)
  config.eval.seed = 0                 # classifier init, batch order, subsets, t-SNE
  config.eval.cache_features = True    # WORKDIR/features/*.npy, keyed by model and data
  config.eval.analysis_normalize = True  # L2-normalise features for distances and t-SNE
  config.eval.tsne_classes = 10
  config.eval.tsne_per_class = 100
  config.eval.tsne_perplexity = 30.0
  config.eval.class_names = ml_collections.FieldReference(None, field_type=list)  # legends
  return config
