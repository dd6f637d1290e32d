# The pipeline, one target per stage. Each stage leaves a DONE stamp when it finishes, so `make demo`
# runs only what is missing, and a stage interrupted midway resumes from its checkpoint.
# Your own data: make demo SOURCE=path/to/images RUNS=runs/mine (PRESET=tiny|large, DEVICE=cuda).
PRESET ?= tiny
SOURCE ?= /usr/share/datasets/fashion-mnist
SIZE ?= 32
CHANNELS ?= 1
DEVICE ?= auto
RUNS ?= runs/$(PRESET)
VENV ?= .venv
PYTHON := $(VENV)/bin/python

# steps and batch sizes per preset: tiny runs on a 2-core CPU, large wants a GPU
AE_STEPS_tiny := 4000
AE_STEPS_large := 40000
CB_STEPS_tiny := 1000
CB_STEPS_large := 5000
BASE_STEPS_tiny := 3000
BASE_STEPS_large := 30000
CASCADE_STEPS_tiny := 3000
CASCADE_STEPS_large := 30000
BATCH_tiny := 64
BATCH_large := 256
PRUNE_THRESHOLD ?= 5
# any of these can be set on the command line (make demo AE_STEPS=100 ...)
AE_STEPS ?= $(AE_STEPS_$(PRESET))
CB_STEPS ?= $(CB_STEPS_$(PRESET))
BASE_STEPS ?= $(BASE_STEPS_$(PRESET))
CASCADE_STEPS ?= $(CASCADE_STEPS_$(PRESET))
BATCH ?= $(BATCH_$(PRESET))
CB_BATCH ?= 128
CONFIGS ?= configs
# each stage's wall time and peak memory are appended to $(RUNS)/timings.log
TIMER = $(if $(wildcard /usr/bin/time),/usr/bin/time -a -o $(RUNS)/timings.log -f "$(1): %e s wall; %M KB peak")

DATA := $(RUNS)/data/DONE
AUTOENCODER := $(RUNS)/autoencoder/DONE
FMAPS := $(RUNS)/fmaps/DONE
LEVELS := cond l1 l2
CODEBOOKS := $(LEVELS:%=$(RUNS)/codebooks/%/DONE)
PRUNED := $(LEVELS:%=$(RUNS)/pruned/%/DONE)
BASE := $(RUNS)/transformers/base/DONE
CASCADE := $(RUNS)/transformers/cascade/DONE
GENERATED := $(RUNS)/generated/DONE
REPORT := $(RUNS)/report/DONE
COMPRESSED := $(RUNS)/compressed/autoencoder/DONE $(RUNS)/compressed/base/DONE $(RUNS)/compressed/cascade/DONE
GENERATED_COMPRESSED := $(RUNS)/generated_compressed/DONE
REPORT_COMPRESSED := $(RUNS)/report_compressed/DONE
NUM_IMAGES ?= 1000
# evaluate.py flags of every report (the downstream accuracy section runs by default: --no-downstream skips it,
# --downstream-steps/-seeds make it cheaper); the report on the compressed models adds its own
REPORT_FLAGS ?=
COMPRESSED_REPORT_FLAGS ?= --no-downstream
# extra build_dataset.py flags (make lowdata sets --train-per-class)
DATA_FLAGS ?=
AE_ARTIFACT := $(RUNS)/autoencoder/autoencoder.safetensors
codebook = $(RUNS)/pruned/$(1)/codebook.safetensors
# the report's tokenizer ceiling: real images reconstructed through an autoencoder and every pruned codebook
ceiling = --autoencoder-path $(1) $(foreach level,$(LEVELS),--codebook-path $(call codebook,$(level)))
TRAIN_FLAGS = --device $(DEVICE) --max-epoch 1000 --checkpoint-step 1000
# a stage without its DONE stamp was interrupted: it resumes; one whose stamp is older than its inputs
# starts over
RESTART = $(if $(wildcard $@),--overwrite)
# A stage records the settings it was made with in $(SETTINGS); asked for other ones (make demo
# AE_STEPS=8000), it starts over, and so does every stage after it. A stage that starts drops its stamp
# first, so that an interrupted rerun resumes.
SETTINGS := $(RUNS)/settings
same = $(and $(findstring x$(strip $(1)),x$(strip $(2))),$(findstring x$(strip $(2)),x$(strip $(1))))
changed = $(if $(wildcard $(SETTINGS)/$(1)),$(if $(call same,$(2),$(file <$(SETTINGS)/$(1))),,FORCE))
record = mkdir -p $(SETTINGS) && echo '$(strip $(2))' > $(SETTINGS)/$(1)

.PHONY: setup test demo codebooks transformers generate report compress fewshot lowdata bench clean-demo FORCE
.SECONDEXPANSION:

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

demo: setup $(REPORT) $(REPORT_COMPRESSED)
	@echo "demo done: generated images in $(RUNS)/generated (grid.png), quality report in $(RUNS)/report/report.md;"
	@echo "from the compressed models: $(RUNS)/generated_compressed and $(RUNS)/report_compressed/report.md"

codebooks: $(CODEBOOKS) $(PRUNED)
transformers: $(BASE) $(CASCADE)
generate: $(GENERATED)
report: $(REPORT)
compress: $(COMPRESSED)
FORCE:

$(DATA): $$(call changed,data,$$(SOURCE) $$(SIZE) $$(CHANNELS) $$(DATA_FLAGS)) | setup
	rm -f $@
	mkdir -p $(RUNS)
	$(call TIMER,dataset) $(PYTHON) build_dataset.py --source $(SOURCE) --out-dir $(RUNS)/data --size $(SIZE) --channels $(CHANNELS) \
		$(DATA_FLAGS) --overwrite
	$(call record,data,$(SOURCE) $(SIZE) $(CHANNELS) $(DATA_FLAGS))
	touch $@

$(AUTOENCODER): $(DATA) $(CONFIGS)/autoencoder_$(PRESET).json $$(call changed,autoencoder,$$(BATCH) $$(AE_STEPS))
	rm -f $@
	$(call TIMER,autoencoder) $(PYTHON) train_autoencoder.py --dataset-path $(RUNS)/data/dataset.json --config-path $(CONFIGS)/autoencoder_$(PRESET).json \
		--out-dir $(RUNS)/autoencoder --batch-size $(BATCH) --max-steps $(AE_STEPS) $(TRAIN_FLAGS) $(RESTART)
	$(call record,autoencoder,$(BATCH) $(AE_STEPS))
	touch $@

$(FMAPS): $(AUTOENCODER)
	$(call TIMER,fmaps) $(PYTHON) generate_fmap_dataset.py --dataset-path $(RUNS)/data/dataset.json --model-path $(AE_ARTIFACT) \
		--out-dir $(RUNS)/fmaps --device $(DEVICE)
	touch $@

$(RUNS)/codebooks/%/DONE: $(FMAPS) $(CONFIGS)/codebook_$(PRESET)_%.json $$(call changed,codebook_$$*,$$(CB_BATCH) $$(CB_STEPS))
	rm -f $@
	$(call TIMER,codebook $*) $(PYTHON) train_codebook.py --dataset-path $(RUNS)/fmaps/dataset.json --decoder-path $(AE_ARTIFACT) \
		--config-path $(CONFIGS)/codebook_$(PRESET)_$*.json --out-dir $(RUNS)/codebooks/$* --batch-size $(CB_BATCH) \
		--max-steps $(CB_STEPS) $(TRAIN_FLAGS) $(RESTART)
	$(call record,codebook_$*,$(CB_BATCH) $(CB_STEPS))
	touch $@

$(RUNS)/pruned/%/DONE: $(RUNS)/codebooks/%/DONE $$(call changed,pruned_$$*,$$(PRUNE_THRESHOLD))
	rm -f $@
	$(call TIMER,prune $*) $(PYTHON) prune_codebook.py --dataset-path $(RUNS)/fmaps/dataset.json --device $(DEVICE) \
		--codebook-path $(RUNS)/codebooks/$*/codebook.safetensors --prune-threshold $(PRUNE_THRESHOLD) --out-dir $(RUNS)/pruned/$*
	$(call record,pruned_$*,$(PRUNE_THRESHOLD))
	touch $@

$(BASE): $(PRUNED) $(CONFIGS)/transformer_$(PRESET)_base.json $$(call changed,base,$$(BATCH) $$(BASE_STEPS))
	rm -f $@
	$(call TIMER,base transformer) $(PYTHON) train_transformer.py --train-base-model --dataset-path $(RUNS)/fmaps/dataset.json \
		--lr-codebook-path $(call codebook,cond) --hr-codebook-path $(call codebook,l1) --decoder-path $(AE_ARTIFACT) \
		--config-path $(CONFIGS)/transformer_$(PRESET)_base.json --out-dir $(RUNS)/transformers/base \
		--batch-size $(BATCH) --max-steps $(BASE_STEPS) $(TRAIN_FLAGS) $(RESTART)
	$(call record,base,$(BATCH) $(BASE_STEPS))
	touch $@

$(CASCADE): $(PRUNED) $(CONFIGS)/transformer_$(PRESET)_cascade.json $$(call changed,cascade,$$(BATCH) $$(CASCADE_STEPS))
	rm -f $@
	$(call TIMER,cascade transformer) $(PYTHON) train_transformer.py --dataset-path $(RUNS)/fmaps/dataset.json \
		--lr-codebook-path $(call codebook,l1) --hr-codebook-path $(call codebook,l2) --decoder-path $(AE_ARTIFACT) \
		--config-path $(CONFIGS)/transformer_$(PRESET)_cascade.json --out-dir $(RUNS)/transformers/cascade \
		--batch-size $(BATCH) --max-steps $(CASCADE_STEPS) $(TRAIN_FLAGS) $(RESTART)
	$(call record,cascade,$(BATCH) $(CASCADE_STEPS))
	touch $@

# the preset's generation config, copied beside the runs so that its relative paths point into them
$(GENERATED): $(BASE) $(CASCADE) $(CONFIGS)/generate_$(PRESET).json $$(call changed,generated,$$(NUM_IMAGES))
	rm -f $@
	cp $(CONFIGS)/generate_$(PRESET).json $(RUNS)/generate.json
	$(call TIMER,generate) $(PYTHON) generate_images.py --config-path $(RUNS)/generate.json --decoder-path $(AE_ARTIFACT) \
		--out-dir $(RUNS)/generated --num-images $(NUM_IMAGES) --seed 0 --device $(DEVICE) $(RESTART)
	$(call record,generated,$(NUM_IMAGES))
	touch $@

$(REPORT): $(GENERATED) $$(call changed,report,$$(REPORT_FLAGS))
	rm -f $@
	$(call TIMER,report) $(PYTHON) evaluate.py --real-path $(RUNS)/data/dataset.json \
		--generated-path $(RUNS)/generated/dataset.json --out-dir $(RUNS)/report --device $(DEVICE) \
		$(call ceiling,$(AE_ARTIFACT)) $(REPORT_FLAGS)
	$(call record,report,$(REPORT_FLAGS))
	touch $@

$(RUNS)/compressed/autoencoder/DONE: $(AUTOENCODER) $(CONFIGS)/compress_$(PRESET)_autoencoder.json
	rm -f $@
	$(call TIMER,compress autoencoder) $(PYTHON) compress.py --model-path $(AE_ARTIFACT) \
		--dataset-path $(RUNS)/data/dataset.json --config-path $(CONFIGS)/compress_$(PRESET)_autoencoder.json \
		--out-dir $(RUNS)/compressed/autoencoder --device $(DEVICE) --batch-size $(BATCH) $(RESTART)
	touch $@

$(RUNS)/compressed/%/DONE: $(RUNS)/transformers/%/DONE $(CONFIGS)/compress_$(PRESET)_transformer.json
	rm -f $@
	$(call TIMER,compress $*) $(PYTHON) compress.py --model-path $(RUNS)/transformers/$*/model.safetensors \
		--dataset-path $(RUNS)/fmaps/dataset.json --config-path $(CONFIGS)/compress_$(PRESET)_transformer.json \
		--out-dir $(RUNS)/compressed/$* --device $(DEVICE) --batch-size $(BATCH) $(RESTART)
	touch $@

# the same generation config, pointed at the compressed models
$(GENERATED_COMPRESSED): $(COMPRESSED) $(CONFIGS)/generate_$(PRESET).json $$(call changed,generated_compressed,$$(NUM_IMAGES))
	rm -f $@
	sed 's#"transformers/#"compressed/#' $(CONFIGS)/generate_$(PRESET).json > $(RUNS)/generate_compressed.json
	$(call TIMER,generate compressed) $(PYTHON) generate_images.py --config-path $(RUNS)/generate_compressed.json \
		--decoder-path $(RUNS)/compressed/autoencoder/autoencoder.safetensors \
		--out-dir $(RUNS)/generated_compressed --num-images $(NUM_IMAGES) --seed 0 --device $(DEVICE) $(RESTART)
	$(call record,generated_compressed,$(NUM_IMAGES))
	touch $@

$(REPORT_COMPRESSED): $(GENERATED_COMPRESSED) $(REPORT) $$(call changed,report_compressed,$$(REPORT_FLAGS) $$(COMPRESSED_REPORT_FLAGS))
	rm -f $@
	$(call TIMER,report compressed) $(PYTHON) evaluate.py --real-path $(RUNS)/data/dataset.json \
		--generated-path $(RUNS)/generated_compressed/dataset.json --out-dir $(RUNS)/report_compressed \
		--classifier-path $(RUNS)/report/classifier.safetensors --device $(DEVICE) \
		$(call ceiling,$(RUNS)/compressed/autoencoder/autoencoder.safetensors) $(REPORT_FLAGS) $(COMPRESSED_REPORT_FLAGS)
	$(call record,report_compressed,$(REPORT_FLAGS) $(COMPRESSED_REPORT_FLAGS))
	touch $@

# Few-shot (seed 000): the transformers fine-tuned (--init-from) on FEWSHOT_COUNT held-out images of one
# class, then that class generated and compared with the class's other held-out images.
FEWSHOT_LABEL ?= Dress
FEWSHOT_COUNT ?= 66
FEWSHOT_STEPS ?= 30
FEWSHOT_IMAGES ?= 300
FEWSHOT := $(RUNS)/fewshot
fewshot: $(FEWSHOT)/report/DONE
	@echo "few-shot done: $(FEWSHOT)/generated (grid.png), report in $(FEWSHOT)/report/report.md"

$(FEWSHOT)/data/DONE: $(DATA) $$(call changed,fewshot,$$(FEWSHOT_LABEL) $$(FEWSHOT_COUNT) $$(FEWSHOT_STEPS) $$(FEWSHOT_IMAGES))
	rm -f $@
	$(PYTHON) build_dataset.py --source $(RUNS)/data/dataset.json --label "$(FEWSHOT_LABEL)" --from-split heldout \
		--train-count $(FEWSHOT_COUNT) --size $(SIZE) --channels $(CHANNELS) --out-dir $(FEWSHOT)/data --overwrite
	$(call record,fewshot,$(FEWSHOT_LABEL) $(FEWSHOT_COUNT) $(FEWSHOT_STEPS) $(FEWSHOT_IMAGES))
	touch $@

$(FEWSHOT)/fmaps/DONE: $(FEWSHOT)/data/DONE $(AUTOENCODER)
	$(PYTHON) generate_fmap_dataset.py --dataset-path $(FEWSHOT)/data/dataset.json --model-path $(AE_ARTIFACT) \
		--out-dir $(FEWSHOT)/fmaps --device $(DEVICE)
	touch $@

$(FEWSHOT)/transformers/base/DONE: $(FEWSHOT)/fmaps/DONE $(BASE)
	rm -f $@
	$(call TIMER,fewshot base) $(PYTHON) train_transformer.py --train-base-model --dataset-path $(FEWSHOT)/fmaps/dataset.json \
		--lr-codebook-path $(call codebook,cond) --hr-codebook-path $(call codebook,l1) --decoder-path $(AE_ARTIFACT) \
		--init-from $(RUNS)/transformers/base/model.safetensors --config-path $(CONFIGS)/transformer_$(PRESET)_base.json \
		--out-dir $(FEWSHOT)/transformers/base --batch-size 16 --max-steps $(FEWSHOT_STEPS) $(TRAIN_FLAGS) $(RESTART)
	touch $@

$(FEWSHOT)/transformers/cascade/DONE: $(FEWSHOT)/fmaps/DONE $(CASCADE)
	rm -f $@
	$(call TIMER,fewshot cascade) $(PYTHON) train_transformer.py --dataset-path $(FEWSHOT)/fmaps/dataset.json \
		--lr-codebook-path $(call codebook,l1) --hr-codebook-path $(call codebook,l2) --decoder-path $(AE_ARTIFACT) \
		--init-from $(RUNS)/transformers/cascade/model.safetensors --config-path $(CONFIGS)/transformer_$(PRESET)_cascade.json \
		--out-dir $(FEWSHOT)/transformers/cascade --batch-size 16 --max-steps $(FEWSHOT_STEPS) $(TRAIN_FLAGS) $(RESTART)
	touch $@

# the preset's generation config with the fine-tuned models, the main run's codebooks and the class
$(FEWSHOT)/generated/DONE: $(FEWSHOT)/transformers/base/DONE $(FEWSHOT)/transformers/cascade/DONE
	rm -f $@
	sed -e 's#"pruned/#"../pruned/#' -e 's#"label": null#"label": "$(FEWSHOT_LABEL)"#' \
		$(CONFIGS)/generate_$(PRESET).json > $(FEWSHOT)/generate.json
	$(call TIMER,fewshot generate) $(PYTHON) generate_images.py --config-path $(FEWSHOT)/generate.json \
		--decoder-path $(AE_ARTIFACT) --out-dir $(FEWSHOT)/generated --num-images $(FEWSHOT_IMAGES) --seed 0 \
		--device $(DEVICE) $(RESTART)
	touch $@

$(FEWSHOT)/report/DONE: $(FEWSHOT)/generated/DONE $(REPORT)
	$(call TIMER,fewshot report) $(PYTHON) evaluate.py --real-path $(FEWSHOT)/data/dataset.json \
		--generated-path $(FEWSHOT)/generated/dataset.json --out-dir $(FEWSHOT)/report \
		--classifier-path $(RUNS)/report/classifier.safetensors --device $(DEVICE) $(call ceiling,$(AE_ARTIFACT)) $(REPORT_FLAGS)
	touch $@

# The low-data benchmark: the whole chain trained from scratch on LOWDATA_PER_CLASS real training images of
# each class (the held-out split untouched), LOWDATA_IMAGES images generated, and the report, whose
# downstream section adds them to those same real images: the generator never sees more real images than
# the classifier it helps. Any setting passes on (make lowdata PRESET=... AE_STEPS=...).
LOWDATA_PER_CLASS ?= 100
LOWDATA_IMAGES ?= 10000
LOWDATA_RUNS ?= $(RUNS)_lowdata$(LOWDATA_PER_CLASS)
lowdata:
	$(MAKE) report RUNS=$(LOWDATA_RUNS) DATA_FLAGS="--train-per-class $(LOWDATA_PER_CLASS)" NUM_IMAGES=$(LOWDATA_IMAGES) \
		REPORT_FLAGS="--downstream-per-class $(LOWDATA_PER_CLASS) $(REPORT_FLAGS)"
	@echo "low-data benchmark done: $(LOWDATA_RUNS)/report/report.md (downstream accuracy), $(LOWDATA_RUNS)/timings.log"

bench: $(REPORT_COMPRESSED)
	$(PYTHON) bench/run.py --runs $(RUNS) --out $(RUNS)/bench.json --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE))

clean-demo:
	rm -rf $(RUNS)
