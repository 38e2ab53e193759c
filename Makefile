# ov3d_ros development commands. `make demo` and `make test` set up what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD := build/interfaces
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_SRV := $(VENV)/.srv-installed
DEMO_OUT ?= demo_output
# sparse convolutions for the learned affinity: the CUDA 12 build where a GPU is present, else the CPU build
SPCONV ?= $(shell command -v nvidia-smi > /dev/null 2>&1 && echo 'spconv-cu120==2.3.6 cumm-cu120<0.5' || echo 'spconv==2.3.8 cumm==0.7.11')
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp
export HF_HUB_OFFLINE := 1

.PHONY: setup browser demo test eval eval-scenes eval-tune eval-test eval-bags train-models clean

setup: $(STAMP_SRV) browser

# Debian's chromium and chromedriver for the browser-view test (test/tools/test_web_view.py skips without them)
browser:
	@mkdir -p build
	@{ command -v chromium && command -v chromedriver; } > /dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } > build/apt.log 2>&1 || \
	  echo "chromium could not be installed (see build/apt.log): the browser-view test will be skipped"

$(STAMP_DEPS): requirements.txt requirements-runtime.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@mkdir -p build
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt > build/pip.log 2>&1 \
	  || { grep -v 'is ignored' build/pip.log; exit 1; }
	$(PY) -m pip install -q --disable-pip-version-check $(SPCONV) >> build/pip.log 2>&1 \
	  || { grep -v 'is ignored' build/pip.log; exit 1; }
	$(PY) -c "import torch, open_clip, rclpy, sensor_msgs.msg, spconv.pytorch"
	touch $@

# Install this checkout in editable mode (no dependencies) for the console scripts (ov3d, ov3d_demo,
# ov3d_mapping_node, ...), then generate the messages and services with rosidl into the venv (the venv root is a
# ROS prefix). pip first: it removes an older install of the same name, the generated modules included.
$(STAMP_SRV): $(STAMP_DEPS) $(wildcard srv/*.srv msg/*.msg) CMakeLists.txt package.xml setup.py
	@mkdir -p build
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
	  --config-settings editable_mode=compat -e . > build/pip-editable.log 2>&1 || { cat build/pip-editable.log; exit 1; }
	AMENT_PREFIX_PATH=$(abspath $(VENV)) CMAKE_PREFIX_PATH=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
	  cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DOV3D_INSTALL_PYTHON=OFF \
	  -DCMAKE_INSTALL_PREFIX=$(abspath $(VENV)) -DPython3_EXECUTABLE=$(abspath $(PY)) > $(BUILD).configure.log 2>&1 \
	  || { cat $(BUILD).configure.log; exit 1; }
	cmake --build $(BUILD) -j2 > $(BUILD).build.log 2>&1 || { tail -50 $(BUILD).build.log; exit 1; }
	cmake --install $(BUILD) > $(BUILD).install.log 2>&1 || { tail -50 $(BUILD).install.log; exit 1; }
	$(PY) -c "from ov3d_ros.srv import LoadMap, MergeMap, SaveMap, SegmentByText, SetVocabulary; import ov3d_ros.core"
	cd / && $(abspath $(VENV))/bin/ov3d --help > /dev/null
	touch $@

test: setup
	$(PY) -m pytest test -q

demo: setup
	$(PY) -m ov3d_ros.tools.demo --out $(DEMO_OUT)

# The evaluation protocol (README "Evaluation world"): three disjoint splits of generated scenes, SIMULATED
# feature source (config/eval.yaml). Training scenes (0-3, 8-11) only for the teacher and the student, the tuning
# split (200-207) for every hyperparameter and default, the test split (100-109) only for the reported tables.
# `make train-models` (re)trains the shipped models (3 seeds + the oracle); `make eval` never trains.
EVAL_OUT ?= eval_output
TRAIN_OUT ?= train_output
MODELS ?= ov3d_ros/models
# 160x120 images fused at pixel stride 1 (the point density of 320x240 at stride 2), 4 px simulated patches
EVAL_ARGS ?= --config config/eval.yaml --quiet --set map.pixel_stride=1 --set features.sim_patch_px=4
SCENE_ARGS ?= --width 160 --height 120 --frames 20 --quiet
TEST_SEED ?= 100
TEST_COUNT ?= 10
# the online (incremental, keyframe by keyframe) run of the shipped default is the expensive one: on these scenes
# (all of the test split; name fewer, e.g. `TEST_INC_SCENES="scene_0100 scene_0101"`, for a quick run)
TEST_INC_SCENES ?= scene_????
TUNE_SEED ?= 200
TUNE_COUNT ?= 8
TRAIN_BLOCKS ?= 0 8
TRAIN_COUNT ?= 4
TRAIN_SCENE_ARGS ?= --width 160 --height 120 --frames 16 --quiet
TRAIN_SET ?= --cache $(TRAIN_OUT)/voxels
TEACHER_ARGS ?= --steps 150 --max-voxels 12000 --pairs 512
STUDENT_SCENES ?= $(TRAIN_OUT)/scenes/scene_0000
STUDENT_ARGS ?= --steps 100 --max-tiles 1
SEEDS ?= 0 1 2
# The student data-fraction ablation (tuning split): students of the seed-0 teacher on more or less of the training
# data, same steps; the tag is the percentage of the teacher's voxels (3 = the shipped recipe, so f3 seed 0 is
# the shipped student, bit for bit).
FRACTIONS ?= f0.75 f1.5 f3 f12 f50
FRACTION_f0.75 = $(STUDENT_SCENES) --tile-voxels 3500 --max-tiles 1
FRACTION_f1.5 = $(STUDENT_SCENES) --tile-voxels 7000 --max-tiles 1
FRACTION_f3 = $(STUDENT_SCENES) --max-tiles 1
FRACTION_f12 = $(STUDENT_SCENES)
FRACTION_f50 = $(addprefix $(TRAIN_OUT)/scenes/scene_,0000 0001 0002 0003)
FRACTION_ARGS ?= --steps 100
# whether fraction $(1), seed $(2) is the shipped student itself (then neither trained again nor copied)
is_shipped_fraction = $(filter f3_0,$(1)_$(2))
LEARNED := purify.enabled=true purify.affinity=learned
WHOLE := $(LEARNED) purify.mode=whole
FALLBACK := purify.enabled=true purify.affinity=fallback purify.mode=whole

train-models: setup
	for b in $(TRAIN_BLOCKS); do $(PY) -m ov3d_ros.cli make-scenes --out $(TRAIN_OUT)/scenes --count $(TRAIN_COUNT) \
	  --seed $$b $(TRAIN_SCENE_ARGS) || exit 1; done
	for s in $(SEEDS); do $(PY) -m ov3d_ros.cli train-teacher $(TRAIN_OUT)/scenes/scene_00?? $(EVAL_ARGS) $(TRAIN_SET) --seed $$s $(TEACHER_ARGS) --out $(TRAIN_OUT)/teacher_s$$s.safetensors || exit 1; done
	for s in $(SEEDS); do $(PY) -m ov3d_ros.cli train-affinity $(STUDENT_SCENES) $(EVAL_ARGS) $(TRAIN_SET) \
	  --teacher ssl --teacher-checkpoint $(TRAIN_OUT)/teacher_s$$s.safetensors --seed $$s \
	  $(STUDENT_ARGS) --out $(TRAIN_OUT)/student_s$$s.safetensors || exit 1; done
	$(PY) -m ov3d_ros.cli train-affinity $(STUDENT_SCENES) $(EVAL_ARGS) $(TRAIN_SET) \
	  --teacher ssl --teacher-checkpoint $(TRAIN_OUT)/teacher_s0.safetensors --seed 0 --teacher-clusters 32 \
	  $(STUDENT_ARGS) --out $(TRAIN_OUT)/student_s0_k32.safetensors
	$(PY) -m ov3d_ros.cli train-affinity $(STUDENT_SCENES) $(EVAL_ARGS) $(TRAIN_SET) \
	  --teacher labels $(STUDENT_ARGS) --out $(TRAIN_OUT)/student_oracle.safetensors
	$(foreach f,$(FRACTIONS),$(foreach s,$(SEEDS),$(if $(call is_shipped_fraction,$(f),$(s)),,$(PY) -m ov3d_ros.cli train-affinity \
	  $(FRACTION_$(f)) $(EVAL_ARGS) $(TRAIN_SET) --teacher ssl --teacher-checkpoint $(TRAIN_OUT)/teacher_s0.safetensors \
	  --seed $(s) $(FRACTION_ARGS) --out $(TRAIN_OUT)/fraction/student_$(f)_s$(s).safetensors || exit 1;)))
	mkdir -p $(MODELS)/ablation/fraction
	cp $(TRAIN_OUT)/fraction/student_*.safetensors $(MODELS)/ablation/fraction/
	cp $(TRAIN_OUT)/teacher_s0.safetensors $(MODELS)/teacher_default.safetensors
	cp $(TRAIN_OUT)/student_s0.safetensors $(MODELS)/affinity_default.safetensors
	cp $(TRAIN_OUT)/student_s1.safetensors $(TRAIN_OUT)/student_s2.safetensors $(TRAIN_OUT)/student_oracle.safetensors \
	  $(TRAIN_OUT)/student_s0_k32.safetensors $(MODELS)/ablation/

# Scenes of the tuning and test splits, and the test split's features as 64-d precomputed ones of "another
# model" (simulated features through a fixed random projection).
eval-scenes: setup
	$(PY) -m ov3d_ros.cli make-scenes --out $(EVAL_OUT)/test --count $(TEST_COUNT) --seed $(TEST_SEED) $(SCENE_ARGS)
	$(PY) -m ov3d_ros.cli make-scenes --out $(EVAL_OUT)/tune --count $(TUNE_COUNT) --seed $(TUNE_SEED) $(SCENE_ARGS)
	$(PY) -m ov3d_ros.eval.project_features $(EVAL_OUT)/test/scene_???? --out $(EVAL_OUT)/test_d64 --dim 64 \
	  --config config/eval.yaml --set features.sim_patch_px=4

# Ablations on the tuning split only: student recipe (teacher features / k-means clusters of them), pooling
# iterations T and scale, the oracle for reference; the superpoint vote's k and blend (one pooling per scene), its
# cube size, its minimum superpoint size and T with the vote; scale and T with the vote; the student's data
# fraction (3 seeds each, with and without the vote); the convexity factor of the vote's edges with its blend;
# k and min_vox again around the defaults with the convexity term; the pooling subspace (purify.pool_dim); the
# pooling radius with T;
# query temperature and threshold (synonym queries, one scoring pass per query for all thresholds); the label
# volume's temperature.
ORACLE := purify.checkpoint=$(MODELS)/ablation/student_oracle.safetensors
SP_K ?= 0.01 0.02 0.04
SP_BLEND ?= 0.5 0.7 0.85
SP0 := purify.superpoint_block_vox=0
# What the older superpoint tables ran with: min_vox 20 (grid, blocks), unweighted means (all of them) and no
# convexity term; SPV1: the vote of the tables after the weighting and before the convexity term
SPV1 := purify.superpoint_convex=1.0 purify.superpoint_blend=0.85
SPU := purify.superpoint_weighted=false purify.superpoint_convex=1.0
SP20 := purify.superpoint_min_vox=20 $(SPU)
K32 := purify.checkpoint=$(MODELS)/ablation/student_s0_k32.safetensors
# a fraction student's checkpoint ($(1): tag, $(2): seed); f3 seed 0 is the shipped one
frac_ckpt = purify.checkpoint=$(if $(call is_shipped_fraction,$(1),$(2)),default,$(MODELS)/ablation/fraction/student_$(1)_s$(2).safetensors)
eval-tune: eval-scenes
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_purify $(EVAL_ARGS) \
	  --variant raw purify.enabled=false --variant fallback purify.enabled=true purify.affinity=fallback purify.mode=whole \
	  --variant oracle $(WHOLE) $(ORACLE) \
	  $(foreach r,s0 s0_k32,$(foreach v,T18_s20 T6_s20 T36_s20 T18_s10 T18_s40,--variant $(r)_$(v) $(WHOLE) \
	  $(if $(filter s0,$(r)),purify.checkpoint=default,$(K32)) \
	  purify.iterations=$(subst T,,$(word 1,$(subst _, ,$(v)))) purify.scale=$(subst s,,$(word 2,$(subst _, ,$(v)))).0))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_superpoints $(EVAL_ARGS) \
	  --variant raw purify.enabled=false --variant "s0, pooling only" $(WHOLE) purify.checkpoint=default purify.superpoint_k=0 \
	  $(foreach k,$(SP_K),$(foreach b,$(SP_BLEND),--variant s0_k$(k)_b$(b) $(WHOLE) purify.checkpoint=default \
	  purify.superpoint_k=$(k) purify.superpoint_blend=$(b) $(SP0) $(SP20))) \
	  --variant "superpoints only (no pooling)" $(FALLBACK) purify.iterations=0 $(SP0) $(SP20) \
	  --variant "fallback, pooling only" $(FALLBACK) purify.superpoint_k=0 \
	  --variant "fallback + superpoints" $(FALLBACK) $(SP0) $(SP20) \
	  --variant "oracle, pooling only" $(WHOLE) $(ORACLE) purify.superpoint_k=0 \
	  --variant "oracle + superpoints" $(WHOLE) $(ORACLE) $(SP0) $(SP20)
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_superpoint_blocks $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  $(foreach b,0 16 32 64,--variant b$(b) $(WHOLE) purify.checkpoint=default purify.superpoint_block_vox=$(b) $(SP20))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_superpoint_min $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  $(foreach m,5 10 20 40 80 160 320,--variant min$(m) $(WHOLE) purify.checkpoint=default \
	  purify.superpoint_min_vox=$(m) $(SPU)) \
	  $(foreach t,6 12,--variant T$(t)_min40 $(WHOLE) purify.checkpoint=default purify.iterations=$(t) $(SPU)) \
	  --variant "min40, means weighted by fusion weight" $(WHOLE) purify.checkpoint=default $(SPV1) \
	  $(foreach k,0.01 0.02 0.04,$(foreach b,0.85 0.95,--variant k$(k)_b$(b)_min20 $(WHOLE) purify.checkpoint=default \
	  purify.superpoint_k=$(k) purify.superpoint_blend=$(b) $(SP20)))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_scale $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  $(foreach v,s20_T18 s5_T18 s10_T18 s40_T18 s10_T36 s20_T36,--variant $(v) $(WHOLE) \
	  purify.checkpoint=default $(SPV1) \
	  purify.iterations=$(subst T,,$(word 2,$(subst _, ,$(v)))) purify.scale=$(subst s,,$(word 1,$(subst _, ,$(v)))).0)
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_data_fraction $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  $(foreach f,$(FRACTIONS),$(foreach s,$(SEEDS),--variant "$(f), pooling only@s$(s)" $(WHOLE) \
	  $(call frac_ckpt,$(f),$(s)) purify.superpoint_k=0 --variant "$(f)@s$(s)" $(WHOLE) \
	  $(call frac_ckpt,$(f),$(s)) $(SPV1)))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_superpoint_convex $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  $(foreach c,1.0 0.5 0.25 0.0,$(foreach b,0.85 0.95,--variant c$(c)_b$(b) $(WHOLE) purify.checkpoint=default \
	  purify.superpoint_convex=$(c) purify.superpoint_blend=$(b))) \
	  $(foreach b,0.9 1.0,--variant c0.5_b$(b) $(WHOLE) purify.checkpoint=default purify.superpoint_convex=0.5 \
	  purify.superpoint_blend=$(b)) \
	  --variant c0.5_b0.95_min80 $(WHOLE) purify.checkpoint=default purify.superpoint_convex=0.5 \
	  purify.superpoint_blend=0.95 purify.superpoint_min_vox=80
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_superpoint_retune $(EVAL_ARGS) \
	  --variant raw purify.enabled=false --variant default $(WHOLE) purify.checkpoint=default \
	  $(foreach k,0.015 0.03,--variant k$(k) $(WHOLE) purify.checkpoint=default purify.superpoint_k=$(k)) \
	  $(foreach m,30 60,--variant min$(m) $(WHOLE) purify.checkpoint=default purify.superpoint_min_vox=$(m))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_pool_dim $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  $(foreach d,64 0 32,--variant pool_dim$(d) $(WHOLE) purify.checkpoint=default purify.pool_dim=$(d))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_radius $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  $(foreach v,r1_T18 r3_T18 r1_T36 r1_T72,--variant $(v) $(WHOLE) purify.checkpoint=default \
	  purify.radius_vox=$(subst r,,$(word 1,$(subst _, ,$(v)))) purify.iterations=$(subst T,,$(word 2,$(subst _, ,$(v)))))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_query $(EVAL_ARGS) --queries \
	  --query-thresholds 0.3 0.4 0.5 0.55 0.6 0.7 0.8 0.9 \
	  $(foreach t,0.15 0.05 0.02 0.01,--variant T$(t) $(WHOLE) purify.checkpoint=default query.temperature=$(t))
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/tune/scene_???? --out $(EVAL_OUT)/tune_labels $(EVAL_ARGS) \
	  $(foreach t,0.15 0.05 0.01,--variant labels_T$(t) $(WHOLE) purify.checkpoint=default "labels.vocabulary=[gt]" \
	  labels.temperature=$(t))

# The reported tables, on the test split only: shipped student with the default config (incremental) and
# whole-map, its three training seeds, the fallback affinity, the oracle, each with and without the superpoint
# vote, and the vote alone; the same checkpoint on 64-d features. Learned and oracle rows use the default
# superpoint settings unless they say "pooling only" (purify.superpoint_k=0).
eval-test: eval-scenes
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/test/scene_???? --out $(EVAL_OUT)/test_table $(EVAL_ARGS) \
	  --variant raw purify.enabled=false \
	  --variant "superpoints only (no pooling), whole-map superpoints" $(FALLBACK) purify.iterations=0 $(SP0) \
	  --variant "fallback, pooling only" $(FALLBACK) purify.superpoint_k=0 \
	  --variant "fallback + superpoints, whole-map superpoints" $(FALLBACK) $(SP0) \
	  --variant "learned s0, pooling only" $(WHOLE) purify.checkpoint=default purify.superpoint_k=0 \
	  --variant learned@s0 $(WHOLE) purify.checkpoint=default \
	  --variant "learned s0, every dimension pooled (pool_dim 0)" $(WHOLE) purify.checkpoint=default purify.pool_dim=0 \
	  --variant "learned s0, superpoints over the whole map (block 0)" $(WHOLE) purify.checkpoint=default $(SP0) \
	  --variant learned@s1 $(WHOLE) purify.checkpoint=$(MODELS)/ablation/student_s1.safetensors \
	  --variant learned@s2 $(WHOLE) purify.checkpoint=$(MODELS)/ablation/student_s2.safetensors \
	  --variant "oracle (labels teacher), pooling only" $(WHOLE) $(ORACLE) purify.superpoint_k=0 \
	  --variant "oracle (labels teacher) + superpoints" $(WHOLE) $(ORACLE)
	$(PY) -m ov3d_ros.cli eval $(addprefix $(EVAL_OUT)/test/,$(TEST_INC_SCENES)) --out $(EVAL_OUT)/test_incremental \
	  $(EVAL_ARGS) --variant "learned (shipped), whole" $(WHOLE) purify.checkpoint=default \
	  --variant "learned (shipped, default config: incremental)" $(LEARNED) purify.mode=incremental purify.checkpoint=default
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/test_d64/scene_???? --out $(EVAL_OUT)/test_d64_table $(EVAL_ARGS) \
	  --features precomputed --variant "raw, 64-d precomputed" purify.enabled=false \
	  --variant "learned, same checkpoint, whole, pooling only" $(WHOLE) purify.checkpoint=default purify.superpoint_k=0 \
	  --variant "learned, same checkpoint, whole" $(WHOLE) purify.checkpoint=default

eval: eval-tune eval-test
	@cat $(EVAL_OUT)/tune_purify/table_ci.md $(addprefix $(EVAL_OUT)/tune_,$(addsuffix /table_ci.md,superpoints \
	  superpoint_blocks superpoint_min scale data_fraction superpoint_convex pool_dim radius)) \
	  $(EVAL_OUT)/tune_query/queries_sweep.md \
	  $(EVAL_OUT)/tune_labels/table_ci.md \
	  $(EVAL_OUT)/test_table/table_ci.md \
	  $(EVAL_OUT)/test_incremental/table_ci.md $(EVAL_OUT)/test_d64_table/table_ci.md

# The same test scenes replayed from rosbag2 recordings (raw fusion), as a check of the bag reader.
eval-bags: setup
	$(PY) -m ov3d_ros.cli make-scenes --out $(EVAL_OUT)/test_bags --count $(TEST_COUNT) --seed $(TEST_SEED) \
	  $(SCENE_ARGS) --format bag
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/test_bags/scene_????_bag --out $(EVAL_OUT)/bags $(EVAL_ARGS) \
	  --variant raw purify.enabled=false

clean:
	rm -rf build $(DEMO_OUT) $(EVAL_OUT) $(TRAIN_OUT)

# Benchmark-only dependencies (never needed by `make test`): Open3D for benchmarks/bm_compare.py's fusion reference.
.PHONY: bench-deps bench bench-node
bench-deps: setup
	$(PY) -m pip install -q --disable-pip-version-check open3d
	-command -v apt-get > /dev/null && apt-get install -y -q libusb-1.0-0 > /dev/null

bench: bench-deps
	$(PY) benchmarks/bm_compare.py

# The node end to end (README "The node end to end"): the player's 640x480 30 Hz stream for 60 s with queries
# meanwhile, then the round trip on a 100 k-voxel map. BENCH_NODE_ARGS e.g. --seconds 10 or --only map.
BENCH_NODE_ARGS ?=
bench-node: setup
	$(PY) benchmarks/bm_node.py $(BENCH_NODE_ARGS)
