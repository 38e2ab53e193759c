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

.PHONY: setup browser demo test eval clean

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

# The evaluation world: 10 unseen generated scenes (seeds 100-109) as folders and bags, SIMULATED 'clip'
# teacher; raw fusion, the training-free and the learned affinity (folders), raw fusion again from the bags.
EVAL_OUT ?= eval_output
EVAL_ARGS ?= --config config/eval.yaml --quiet
eval: setup
	$(PY) -m ov3d_ros.cli make-scenes --out $(EVAL_OUT)/scenes --count 10 --seed 100 --format both \
	  --width 320 --height 240 --frames 60 --quiet
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/scenes/scene_01?? --out $(EVAL_OUT)/folders $(EVAL_ARGS) \
	  --variant raw --variant fallback purify.enabled=true \
	  --variant learned purify.enabled=true purify.affinity=learned purify.checkpoint=default
	$(PY) -m ov3d_ros.cli eval $(EVAL_OUT)/scenes/scene_01??_bag --out $(EVAL_OUT)/bags $(EVAL_ARGS) --variant raw

clean:
	rm -rf build $(DEMO_OUT) $(EVAL_OUT)

# Benchmark-only dependencies (never needed by `make test`): Open3D for benchmarks/bm_compare.py's fusion reference.
.PHONY: bench-deps bench
bench-deps: setup
	$(PY) -m pip install -q --disable-pip-version-check open3d
	-command -v apt-get > /dev/null && apt-get install -y -q libusb-1.0-0 > /dev/null

bench: bench-deps
	$(PY) benchmarks/bm_compare.py
