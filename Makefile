# The pipeline, one target per stage, with file dependencies: `make demo` runs what is missing and
# resumes what was interrupted. Point it at your own data with SOURCE=/path/to/images.
PRESET ?= tiny
SOURCE ?= /usr/share/datasets/fashion-mnist
SIZE ?= 32
CHANNELS ?= 1
DEVICE ?= auto
RUNS ?= runs/$(PRESET)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DATASET := $(RUNS)/data/dataset.json
AUTOENCODER := $(RUNS)/autoencoder/autoencoder.safetensors
AE_STEPS_tiny := 4000
AE_STEPS_large := 40000

.PHONY: setup test demo clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; fi
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup $(AUTOENCODER)
	@echo "demo done: see $(RUNS)/"

$(DATASET): | setup
	$(PYTHON) build_dataset.py --source $(SOURCE) --out-dir $(RUNS)/data --size $(SIZE) --channels $(CHANNELS)

$(AUTOENCODER): $(DATASET) configs/autoencoder_$(PRESET).json
	$(PYTHON) train_autoencoder.py --dataset-path $(DATASET) --config-path configs/autoencoder_$(PRESET).json \
		--out-dir $(RUNS)/autoencoder --device $(DEVICE) --batch-size 64 --max-epoch 100 \
		--max-steps $(AE_STEPS_$(PRESET)) --checkpoint-step 1000

clean-demo:
	rm -rf $(RUNS)
