# The pipeline, one target per stage. Each stage leaves a DONE stamp when it finishes, so `make demo`
# runs only what is missing, and a stage interrupted midway resumes from its checkpoint.
# Your own images: make demo SOURCE=path/to/images SIZE=64 (PRESET=tiny|large, DEVICE=cuda).
PRESET ?= tiny
SOURCE ?= /usr/share/datasets/fashion-mnist
SIZE ?= 32
# CHANNELS=1 or 3 forces grey or colour; left empty, the dataset build detects it
CHANNELS ?=
FIT ?= pad
DEVICE ?= auto
# auto: the training stages run in bfloat16 autocast where the device multiplies it natively; float32: never
PRECISION ?= auto
CONFIGS ?= configs
# a preset is a folder of configs for one image size, with its steps in steps.mk. A preset whose file `base`
# names another one takes from it (and from its base in turn) every config file it does not hold itself, and a
# config file whose "base" key names another file holds only the settings that differ from that file's
PRESET_DIR := $(CONFIGS)/$(PRESET)$(SIZE)
ifeq ($(wildcard $(PRESET_DIR)/steps.mk),)
$(error no preset '$(PRESET)' for SIZE=$(SIZE): $(PRESET_DIR) does not exist (presets: $(notdir $(wildcard $(CONFIGS)/*))))
endif
include $(PRESET_DIR)/steps.mk
preset_chain = $(1) $(if $(wildcard $(CONFIGS)/$(1)/base),$(call preset_chain,$(strip $(file <$(CONFIGS)/$(1)/base))))
PRESET_DIRS := $(addprefix $(CONFIGS)/,$(call preset_chain,$(PRESET)$(SIZE)))
# the preset's config file named $(1), and (for a stage's prerequisites) with the file its "base" key names
config = $(or $(firstword $(wildcard $(addsuffix /$(1),$(PRESET_DIRS)))),$(PRESET_DIR)/$(1))
config_deps = $(foreach f,$(call config,$(1)),$(f) $(wildcard $(addprefix $(dir $(f)),$(filter %.json,$(subst ", ,$(file <$(f)))))))
RUNS ?= runs/$(PRESET)$(SIZE)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PRUNE_THRESHOLD ?= 5
# augmented copies of each training image for the codebooks and transformers (auto: enough for about
# 8,000 training maps, none for a large dataset)
AUG_COPIES ?= auto
# Independent stages (the codebooks, the transformers, the compressions, the reports) run side by side, one
# job per core (JOBS=1: one at a time). The stages running at once share the cores (core/cores.py: one alone
# takes them all), and print a line per held-out evaluation instead of live progress bars.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
ifeq ($(MAKELEVEL),0)
MAKEFLAGS += -j$(JOBS)
endif
ifneq ($(JOBS),1)
export QARIG_PROGRESS := lines
endif
# each stage's wall time and peak memory are appended to $(RUNS)/timings.log
TIMER = $(if $(wildcard /usr/bin/time),/usr/bin/time -a -o $(RUNS)/timings.log -f "$(1): %e s wall; %M KB peak")

# the token levels, coarse to fine (a codebook config each: cond, l1, l2, ...), and the transformer that
# predicts each level after the first from the one before it (base, cascade, cascade2, ...): coarse_<model> and
# fine_<model> name the two levels a model reads
LEVELS := $(sort $(patsubst codebook_%.json,%,$(notdir $(wildcard $(addsuffix /codebook_*.json,$(PRESET_DIRS))))))
MODELS := $(wordlist 2,$(words $(LEVELS)),x base cascade $(patsubst %,cascade%,$(shell seq 2 $(words $(LEVELS)))))
MODEL_NUMBERS := $(shell seq $(words $(MODELS)))
# the captions loop's label-only reference models (make captions) read the levels of their namesakes
$(foreach n,$(MODEL_NUMBERS),$(foreach m,$(word $(n),$(MODELS)),$(foreach name,$(m) $(m)_label,\
	$(eval coarse_$(name) := $(word $(n),$(LEVELS)))$(eval fine_$(name) := $(word $(n),$(wordlist 2,99,$(LEVELS)))))))
BASE_MODELS := base base_label
# --set flags that point each level of the preset's generation config at $(1)/<model>/model.safetensors, one
# model of $(2) per level (default: MODELS), and at the codebooks it reads and writes
LEVEL_INDEX := $(shell seq 0 $$(( $(words $(MODELS)) - 1 )))
level_paths = $(join $(LEVEL_INDEX:%=--set=%.model_path=),$(patsubst %,$(1)/%/model.safetensors,$(or $(2),$(MODELS)))) \
	$(join $(LEVEL_INDEX:%=--set=%.lr_codebook_path=),$(foreach m,$(or $(2),$(MODELS)),$(call codebook,$(coarse_$(m))))) \
	$(join $(LEVEL_INDEX:%=--set=%.hr_codebook_path=),$(foreach m,$(or $(2),$(MODELS)),$(call codebook,$(fine_$(m)))))

# INIT=<a trained run>: tune from it instead of training from scratch. Its autoencoder and codebooks are used
# as they are, and its transformers are fine-tuned on this run's images for TUNE_STEPS steps (a label they do
# not know becomes a new label of theirs).
INIT ?=
TUNE_STEPS ?= 600
TUNE_EPOCHS ?= 1000
# tuning is short: its held-out figure is taken (and the best step kept) this often
TUNE_CHECKPOINT_STEP ?= 50
ifneq ($(INIT),)
ifeq ($(wildcard $(INIT)/transformers/base/DONE),)
$(error INIT=$(INIT) is not a trained run: $(INIT)/transformers/base/DONE is missing (make transformers RUNS=$(INIT) first))
endif
endif
# the run whose autoencoder and codebooks this one uses: its own, or INIT's
TOKENIZER_RUNS := $(or $(INIT),$(RUNS))

DATA := $(RUNS)/data/DONE
# VALIDATION_SHARE=<fraction>: the chain trains on the rest of the training images and chooses its checkpoints
# (and stops early) on that share of them, carved into $(RUNS)/chain_data, so that the held-out split, on
# which the report takes its figures, is seen by no choice (the low-data and transfer benchmarks set it);
# left empty, the chain's held-out figure is taken on the held-out split
VALIDATION_SHARE ?=
CHAIN_DATA := $(if $(VALIDATION_SHARE),$(RUNS)/chain_data,$(RUNS)/data)
# SAMPLING_CHOICE=fidelity (make lowdata and make transfer set it): before generating, each level's sampling
# settings are chosen among SAMPLING_GRID's (choose_sampling.py) by the Fréchet distance of their images to the
# validation share, in the features of a classifier of the other training images; generation then reads the
# chosen config, $(RUNS)/sampling_choice/generate.json. It needs labels and VALIDATION_SHARE: the held-out split
# is the report's and no choice may see it.
SAMPLING_CHOICE ?=
SAMPLING_GRID ?= --guidance 1,2 --vary 0.temperature=1,0.8 --vary 1.temperature=1,0.85,0.7 --vary 1.top_p=1,0.9
ifneq ($(SAMPLING_CHOICE),)
ifeq ($(VALIDATION_SHARE),)
$(error SAMPLING_CHOICE=$(SAMPLING_CHOICE) chooses on the validation share: set VALIDATION_SHARE too (e.g. 0.1))
endif
endif
AUTOENCODER := $(TOKENIZER_RUNS)/autoencoder/DONE
FMAPS := $(RUNS)/fmaps/DONE
CODEBOOKS := $(LEVELS:%=$(TOKENIZER_RUNS)/codebooks/%/DONE)
PRUNED := $(LEVELS:%=$(TOKENIZER_RUNS)/pruned/%/DONE)
TRANSFORMERS := $(MODELS:%=$(RUNS)/transformers/%/DONE)
SAMPLING_CHOSEN := $(if $(SAMPLING_CHOICE),$(RUNS)/sampling_choice/DONE)
GENERATE_CONFIG = $(if $(SAMPLING_CHOICE),$(RUNS)/sampling_choice/generate.json,$(call config,generate.json))
GENERATED := $(RUNS)/generated/DONE
CURATED := $(RUNS)/curated/DONE
REPORT := $(RUNS)/report/DONE
COMPRESSED := $(RUNS)/compressed/autoencoder/DONE $(MODELS:%=$(RUNS)/compressed/%/DONE)
GENERATED_COMPRESSED := $(RUNS)/generated_compressed/DONE
REPORT_COMPRESSED := $(RUNS)/report_compressed/DONE
EXPORT := $(RUNS)/export/DONE
GENERATED_EXPORT := $(RUNS)/generated_export/DONE
REPORT_EXPORT := $(RUNS)/report_export/DONE
NUM_IMAGES ?= 1000
# evaluate.py flags of every report (the downstream accuracy section runs by default: --no-downstream skips it,
# --downstream-steps/-seeds make it cheaper); the report on the compressed models adds its own
REPORT_FLAGS ?=
COMPRESSED_REPORT_FLAGS ?= --no-downstream
# curate_images.py flags (e.g. --labels teacher --filter agree instead of the validation split's choice)
CURATE_FLAGS ?=
# extra build_dataset.py flags (make lowdata sets --train-per-class)
DATA_FLAGS ?=
AE_ARTIFACT := $(TOKENIZER_RUNS)/autoencoder/autoencoder.safetensors
codebook = $(TOKENIZER_RUNS)/pruned/$(1)/codebook.safetensors
# the main report's classifier, for the reports that compare in its feature space: an unlabelled set has none,
# and those reports then use the pixel-PCA space alone, as the main report did (a shell test: the file is
# made during the run)
REPORT_CLASSIFIER = $$(test -f $(RUNS)/report/classifier.safetensors && \
	echo --classifier-path $(RUNS)/report/classifier.safetensors)
# a preset with a decoder.json and DECODER_STEPS in its steps.mk fine-tunes the decoder to decode the finest
# codebook's quantized maps, and generation decodes with it (a run tuned from INIT: with INIT's, when it has one)
FINEST := $(lastword $(LEVELS))
DECODER_STEPS ?= 0
ifneq ($(if $(INIT),$(wildcard $(INIT)/decoder/DONE),$(and $(wildcard $(call config,decoder.json)),$(filter-out 0,$(DECODER_STEPS)))),)
DECODER := $(TOKENIZER_RUNS)/decoder/DONE
DECODER_ARTIFACT := $(TOKENIZER_RUNS)/decoder/autoencoder.safetensors
else
DECODER := $(AUTOENCODER)
DECODER_ARTIFACT := $(AE_ARTIFACT)
endif
# the report's tokenizer ceiling: real images reconstructed through an autoencoder and every pruned codebook
# (and the finest codebook's maps decoded by the decoder $(2), when it is given and is not $(1)'s)
ceiling = --autoencoder-path $(1) $(foreach level,$(LEVELS),--ceiling-codebook $(call codebook,$(level))) \
	$(if $(filter-out $(1),$(2)),--ceiling-decoder $(2))
TRAIN_FLAGS = --device $(DEVICE) --precision $(PRECISION) --checkpoint-step $(CHECKPOINT_STEP)
# a stage without its DONE stamp was interrupted: it resumes; one whose stamp is older than its inputs
# starts over
RESTART = $(if $(wildcard $@),--overwrite)
# a training stage also starts over when an interrupted run of it had other settings than these (its checkpoint
# would resume those): `started` records them as the stage starts, `restart` compares
started = mkdir -p $(SETTINGS) && echo '$(strip $(2))' > $(SETTINGS)/$(1).started
restart = $(if $(or $(wildcard $@),$(if $(wildcard $(SETTINGS)/$(1).started),$(if $(call same,$(2),$(file <$(SETTINGS)/$(1).started)),,yes))),--overwrite)
# A stage records the settings it was made with in $(SETTINGS); asked for other ones (make demo
# AE_STEPS=8000), it starts over, and so does every stage after it. A stage that starts drops its stamp
# first, so that an interrupted rerun resumes.
SETTINGS := $(RUNS)/settings
same = $(and $(findstring x$(strip $(1)),x$(strip $(2))),$(findstring x$(strip $(2)),x$(strip $(1))))
changed = $(if $(wildcard $(SETTINGS)/$(1)),$(if $(call same,$(2),$(file <$(SETTINGS)/$(1))),,FORCE))
record = mkdir -p $(SETTINGS) && echo '$(strip $(2))' > $(SETTINGS)/$(1)
# a transformer's steps, epochs and batch: the base model's or the cascade models', or the tuning's
model_steps = $(if $(INIT),$(TUNE_STEPS) $(TUNE_EPOCHS),$(if $(filter $(BASE_MODELS),$(1)),$(BASE_STEPS) $(BASE_EPOCHS),$(CASCADE_STEPS) $(CASCADE_EPOCHS))) $(BATCH)

.PHONY: setup test test-all demo codebooks transformers generate curate sampling report compress export fewshot lowdata transfer captions captions-reports bench bench-generation bench-chain clean-demo FORCE
.SECONDEXPANSION:

setup: $(VENV)/.installed

# the apt packages: Fashion-MNIST (the demo's data), an icon theme (the colour test set) and GNU time (the
# stage timings in timings.log)
APT_PACKAGES := dataset-fashion-mnist oxygen-icon-theme time
$(VENV)/.installed: requirements.txt
	@missing="$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq $$missing; fi; fi
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

# the fast tier (every stage and error path); test-all adds the slow tier (end-to-end make, the seed's examples,
# multi-node, kill-and-resume)
test: setup
	$(PYTHON) -m pytest -q -n $(JOBS) -m "not slow" tests

test-all: test
	$(PYTHON) -m pytest -q -n $(JOBS) -m slow tests

demo: setup $(REPORT) $(REPORT_COMPRESSED) $(REPORT_EXPORT)
	@echo "demo done: generated images in $(RUNS)/generated (grid.png), quality report in $(RUNS)/report/report.md;"
	@echo "from the compressed models: $(RUNS)/generated_compressed and $(RUNS)/report_compressed/report.md;"
	@echo "from the export bundle $(RUNS)/export (no torch): $(RUNS)/generated_export and $(RUNS)/report_export/report.md"

codebooks: $(CODEBOOKS) $(PRUNED)
transformers: $(TRANSFORMERS)
generate: $(GENERATED)
curate: $(CURATED)
report: $(REPORT)
compress: $(COMPRESSED)
export: $(EXPORT)
FORCE:

$(DATA): $$(call changed,data,$$(SOURCE) $$(SIZE) $$(CHANNELS) $$(FIT) $$(DATA_FLAGS)) | setup
	rm -f $@
	mkdir -p $(RUNS)
	$(call TIMER,dataset) $(PYTHON) build_dataset.py --source $(SOURCE) --out-dir $(RUNS)/data --size $(SIZE) \
		$(if $(CHANNELS),--channels $(CHANNELS)) --fit $(FIT) $(DATA_FLAGS) --overwrite
	$(call record,data,$(SOURCE) $(SIZE) $(CHANNELS) $(FIT) $(DATA_FLAGS))
	touch $@

$(RUNS)/chain_data/DONE: $(DATA) $$(call changed,chain_data,$$(VALIDATION_SHARE))
	rm -f $@
	$(call TIMER,chain dataset) $(PYTHON) build_dataset.py --source $(RUNS)/data/dataset.json --from-split train \
		--holdout $(VALIDATION_SHARE) --size $(SIZE) $(if $(CHANNELS),--channels $(CHANNELS)) --out-dir $(RUNS)/chain_data \
		--overwrite
	$(call record,chain_data,$(VALIDATION_SHARE))
	touch $@

ifeq ($(INIT),)
# the whole chain's (make demo's) wall time estimated before its first training stage: the stages of the record
# ETA_RECORD (a run of the same preset) scaled by the work planned here and this machine's speed (estimate.py)
ETA_RECORD ?= docs/runs/$(PRESET)$(SIZE)
comma := ,
steps_of = $(subst $(eval) ,$(comma),$(strip $(1)))
ETA_WORK = --train "autoencoder=$(call steps_of,$(AE_STEPS) $(AE_EPOCHS) $(BATCH)),images" --images fmaps=maps \
	$(foreach l,$(LEVELS),--train "codebook $(l)=$(call steps_of,$(CB_STEPS) $(CB_EPOCHS) $(CB_BATCH)),maps" \
		--fixed "prune $(l)") \
	$(foreach m,$(MODELS),--train "$(m) transformer=$(call steps_of,$(call model_steps,$(m))),maps" \
		--fixed "compress $(m)") \
	$(if $(VALIDATION_SHARE),--fixed "chain dataset") $(if $(filter-out $(AUTOENCODER),$(DECODER)),--fixed decoder) \
	--fixed "compress autoencoder" --images "generate=$(NUM_IMAGES)" --images "generate compressed=$(NUM_IMAGES)" \
	--images "generate export=$(NUM_IMAGES)" --fixed export --fixed curate --fixed report \
	--fixed "report compressed" --fixed "report export"
$(RUNS)/plan.json: $(CHAIN_DATA)/DONE
	$(PYTHON) estimate.py --dataset-path $(CHAIN_DATA)/dataset.json --out $@ \
		--autoencoder-config $(call config,autoencoder.json) --augment-copies $(AUG_COPIES) $(ETA_WORK) \
		--reference $(ETA_RECORD) $(if $(filter-out 1,$(JOBS)),--side-by-side)

$(AUTOENCODER): $(CHAIN_DATA)/DONE $(call config_deps,autoencoder.json) $$(call changed,autoencoder,$$(BATCH) $$(AE_STEPS) $$(AE_EPOCHS)) \
		| $(RUNS)/plan.json
	rm -f $@
	$(call started,autoencoder,$(BATCH) $(AE_STEPS) $(AE_EPOCHS))
	$(call TIMER,autoencoder) $(PYTHON) train_autoencoder.py --dataset-path $(CHAIN_DATA)/dataset.json \
		--config-path $(call config,autoencoder.json) --out-dir $(RUNS)/autoencoder --batch-size $(BATCH) \
		--max-steps $(AE_STEPS) --max-epoch $(AE_EPOCHS) $(TRAIN_FLAGS) \
		$(call restart,autoencoder,$(BATCH) $(AE_STEPS) $(AE_EPOCHS))
	$(call record,autoencoder,$(BATCH) $(AE_STEPS) $(AE_EPOCHS))
	touch $@
endif

$(FMAPS): $(CHAIN_DATA)/DONE $(AUTOENCODER) $$(call changed,fmaps,$$(AUG_COPIES))
	$(call TIMER,fmaps) $(PYTHON) generate_fmap_dataset.py --dataset-path $(CHAIN_DATA)/dataset.json --model-path $(AE_ARTIFACT) \
		--out-dir $(RUNS)/fmaps --device $(DEVICE) --augment-copies $(AUG_COPIES) \
		--augment-config $(call config,autoencoder.json)
	$(call record,fmaps,$(AUG_COPIES))
	touch $@

$(RUNS)/codebooks/%/DONE: $(FMAPS) $$(call config_deps,codebook_$$*.json) $$(call changed,codebook_$$*,$$(CB_BATCH) $$(CB_STEPS) $$(CB_EPOCHS))
	rm -f $@
	$(call started,codebook_$*,$(CB_BATCH) $(CB_STEPS) $(CB_EPOCHS))
	$(call TIMER,codebook $*) $(PYTHON) train_codebook.py --dataset-path $(RUNS)/fmaps/dataset.json --decoder-path $(AE_ARTIFACT) \
		--config-path $(call config,codebook_$*.json) --out-dir $(RUNS)/codebooks/$* --batch-size $(CB_BATCH) \
		--max-steps $(CB_STEPS) --max-epoch $(CB_EPOCHS) $(TRAIN_FLAGS) \
		$(call restart,codebook_$*,$(CB_BATCH) $(CB_STEPS) $(CB_EPOCHS))
	$(call record,codebook_$*,$(CB_BATCH) $(CB_STEPS) $(CB_EPOCHS))
	touch $@

$(RUNS)/pruned/%/DONE: $(RUNS)/codebooks/%/DONE $$(call changed,pruned_$$*,$$(PRUNE_THRESHOLD))
	rm -f $@
	$(call TIMER,prune $*) $(PYTHON) prune_codebook.py --dataset-path $(RUNS)/fmaps/dataset.json --device $(DEVICE) \
		--codebook-path $(RUNS)/codebooks/$*/codebook.safetensors --prune-threshold $(PRUNE_THRESHOLD) --out-dir $(RUNS)/pruned/$*
	$(call record,pruned_$*,$(PRUNE_THRESHOLD))
	touch $@

$(RUNS)/decoder/DONE: $(RUNS)/pruned/$(FINEST)/DONE $(call config_deps,decoder.json) $$(call changed,decoder,$$(BATCH) $$(DECODER_STEPS) $$(DECODER_EPOCHS))
	rm -f $@
	$(call started,decoder,$(BATCH) $(DECODER_STEPS) $(DECODER_EPOCHS))
	$(call TIMER,decoder) $(PYTHON) train_autoencoder.py --dataset-path $(CHAIN_DATA)/dataset.json --init-from $(AE_ARTIFACT) \
		--decode-codebook $(call codebook,$(FINEST)) --config-path $(call config,decoder.json) --out-dir $(RUNS)/decoder \
		--batch-size $(BATCH) --max-steps $(DECODER_STEPS) --max-epoch $(DECODER_EPOCHS) $(TRAIN_FLAGS) \
		$(call restart,decoder,$(BATCH) $(DECODER_STEPS) $(DECODER_EPOCHS))
	$(call record,decoder,$(BATCH) $(DECODER_STEPS) $(DECODER_EPOCHS))
	touch $@

# base: the condition token and the first level; each cascade model: the next level from the one before
$(RUNS)/transformers/%/DONE: $(FMAPS) $(PRUNED) $$(call config_deps,transformer_$$*.json) $(if $(INIT),$(INIT)/transformers/%/DONE) \
		$$(call changed,$$*,$$(call model_steps,$$*) $$(INIT))
	rm -f $@
	$(call started,$*,$(call model_steps,$*) $(INIT))
	$(call TIMER,$* transformer) $(PYTHON) train_transformer.py $(if $(filter $(BASE_MODELS),$*),--train-base-model) \
		--dataset-path $(RUNS)/fmaps/dataset.json --decoder-path $(AE_ARTIFACT) \
		--lr-codebook-path $(call codebook,$(coarse_$*)) --hr-codebook-path $(call codebook,$(fine_$*)) \
		--config-path $(call config,transformer_$*.json) --out-dir $(RUNS)/transformers/$* --batch-size $(BATCH) \
		--max-steps $(word 1,$(call model_steps,$*)) --max-epoch $(word 2,$(call model_steps,$*)) --device $(DEVICE) --precision $(PRECISION) \
		$(if $(INIT),--checkpoint-step $(TUNE_CHECKPOINT_STEP) --init-from $(INIT)/transformers/$*/model.safetensors,\
		--checkpoint-step $(CHECKPOINT_STEP)) $(call restart,$*,$(call model_steps,$*) $(INIT))
	$(call record,$*,$(call model_steps,$*) $(INIT))
	touch $@

# the preset's generation config, pointed at this run's models (generated/generate.json is the config it was
# made with)
$(RUNS)/sampling_choice/DONE: $(TRANSFORMERS) $(DECODER) $(call config_deps,generate.json) \
		$$(call changed,sampling_choice,$$(SAMPLING_GRID))
	rm -f $@
	$(call TIMER,sampling choice) $(PYTHON) choose_sampling.py --config-path $(call config,generate.json) \
		$(call level_paths,$(RUNS)/transformers) --decoder-path $(DECODER_ARTIFACT) --real-path $(CHAIN_DATA)/dataset.json \
		--out-dir $(RUNS)/sampling_choice --criterion $(SAMPLING_CHOICE) --validation heldout --images 1000 \
		--device $(DEVICE) $(SAMPLING_GRID)
	$(call record,sampling_choice,$(SAMPLING_GRID))
	touch $@

$(GENERATED): $(TRANSFORMERS) $(DECODER) $(SAMPLING_CHOSEN) $(call config_deps,generate.json) $$(call changed,generated,$$(NUM_IMAGES))
	rm -f $@
	$(call TIMER,generate) $(PYTHON) generate_images.py --config-path $(GENERATE_CONFIG) \
		$(call level_paths,$(RUNS)/transformers) --decoder-path $(DECODER_ARTIFACT) \
		--out-dir $(RUNS)/generated --num-images $(NUM_IMAGES) --seed 0 --device $(DEVICE) $(RESTART)
	$(call record,generated,$(NUM_IMAGES))
	touch $@

# the generated images curated for training a classifier: soft labels from a teacher, near-copies dropped, the
# labels and the filter chosen on a validation split of the real training images: the chain's validation share
# when it has one (images the generator never saw), else a fifth of each class's training images
CURATE_REAL = $(if $(VALIDATION_SHARE),--real-path $(CHAIN_DATA)/dataset.json --validation heldout,--real-path $(RUNS)/data/dataset.json)
$(CURATED): $(GENERATED) $$(call changed,curated,$$(CURATE_FLAGS) $$(VALIDATION_SHARE))
	rm -f $@
	$(call TIMER,curate) $(PYTHON) curate_images.py $(CURATE_REAL) \
		--generated-path $(RUNS)/generated/dataset.json --out-dir $(RUNS)/curated --device $(DEVICE) $(CURATE_FLAGS)
	$(call record,curated,$(CURATE_FLAGS) $(VALIDATION_SHARE))
	touch $@

# the sampling settings (guidance scale, temperature) for images that train a classifier, measured on a
# validation split of the training images: $(RUNS)/sampling/sampling.json, and generate.json at the best one
SAMPLING_FLAGS ?=
sampling: $(GENERATED)
	$(call TIMER,sampling) $(PYTHON) choose_sampling.py --config-path $(RUNS)/generated/generate.json \
		--decoder-path $(DECODER_ARTIFACT) --real-path $(RUNS)/data/dataset.json --out-dir $(RUNS)/sampling \
		--device $(DEVICE) $(SAMPLING_FLAGS)

$(REPORT): $(GENERATED) $(CURATED) $$(call changed,report,$$(REPORT_FLAGS))
	rm -f $@
	$(call TIMER,report) $(PYTHON) evaluate.py --real-path $(RUNS)/data/dataset.json \
		--generated-path $(RUNS)/generated/dataset.json --curated-path $(RUNS)/curated/dataset.json \
		--out-dir $(RUNS)/report --device $(DEVICE) \
		$(call ceiling,$(AE_ARTIFACT),$(DECODER_ARTIFACT)) $(REPORT_FLAGS)
	$(call record,report,$(REPORT_FLAGS))
	touch $@

# after the pruned codebooks (order only): with one job per core, the transformers on the critical path take the
# cores first, and the autoencoder's compression the first one they free. It compresses the autoencoder, not a
# decoder fine-tuned adversarially: compression's fine-tuning (reconstruction alone) undoes what the adversarial
# loss gave (make demo: the compressed models' images 11.7 from the real ones with it, 8.0 with the autoencoder)
$(RUNS)/compressed/autoencoder/DONE: $(AUTOENCODER) $(call config_deps,compress_autoencoder.json) | $(PRUNED)
	rm -f $@
	$(call TIMER,compress autoencoder) $(PYTHON) compress.py --model-path $(AE_ARTIFACT) \
		--dataset-path $(CHAIN_DATA)/dataset.json --config-path $(call config,compress_autoencoder.json) \
		--out-dir $(RUNS)/compressed/autoencoder --device $(DEVICE) --precision $(PRECISION) --batch-size $(BATCH) $(RESTART)
	touch $@

$(RUNS)/compressed/%/DONE: $(RUNS)/transformers/%/DONE $(call config_deps,compress_transformer.json)
	rm -f $@
	$(call TIMER,compress $*) $(PYTHON) compress.py --model-path $(RUNS)/transformers/$*/model.safetensors \
		--dataset-path $(RUNS)/fmaps/dataset.json --config-path $(call config,compress_transformer.json) \
		--out-dir $(RUNS)/compressed/$* --device $(DEVICE) --precision $(PRECISION) --batch-size $(BATCH) $(RESTART)
	touch $@

# the same generation config, pointed at the compressed models
$(GENERATED_COMPRESSED): $(COMPRESSED) $(call config_deps,generate.json) $$(call changed,generated_compressed,$$(NUM_IMAGES))
	rm -f $@
	$(call TIMER,generate compressed) $(PYTHON) generate_images.py --config-path $(call config,generate.json) \
		$(call level_paths,$(RUNS)/compressed) \
		--decoder-path $(RUNS)/compressed/autoencoder/autoencoder.safetensors \
		--out-dir $(RUNS)/generated_compressed --num-images $(NUM_IMAGES) --seed 0 --device $(DEVICE) $(RESTART)
	$(call record,generated_compressed,$(NUM_IMAGES))
	touch $@

$(REPORT_COMPRESSED): $(GENERATED_COMPRESSED) $(REPORT) $$(call changed,report_compressed,$$(REPORT_FLAGS) $$(COMPRESSED_REPORT_FLAGS))
	rm -f $@
	$(call TIMER,report compressed) $(PYTHON) evaluate.py --real-path $(RUNS)/data/dataset.json \
		--generated-path $(RUNS)/generated_compressed/dataset.json --out-dir $(RUNS)/report_compressed \
		$(REPORT_CLASSIFIER) --device $(DEVICE) \
		$(call ceiling,$(RUNS)/compressed/autoencoder/autoencoder.safetensors) $(REPORT_FLAGS) $(COMPRESSED_REPORT_FLAGS)
	$(call record,report_compressed,$(REPORT_FLAGS) $(COMPRESSED_REPORT_FLAGS))
	touch $@

# The compressed generator exported as one bundle for onnxruntime, then images generated by the bundle's
# own runner (numpy and onnxruntime, no torch) and reported on like the others.
$(EXPORT): $(COMPRESSED) $(call config_deps,generate.json)
	rm -f $@
	$(call TIMER,export) $(PYTHON) export.py --config-path $(call config,generate.json) $(call level_paths,$(RUNS)/compressed) \
		--decoder-path $(RUNS)/compressed/autoencoder/autoencoder.safetensors --out-dir $(RUNS)/export --overwrite
	touch $@

$(GENERATED_EXPORT): $(EXPORT) $$(call changed,generated_export,$$(NUM_IMAGES))
	rm -f $@
	$(call TIMER,generate export) $(PYTHON) $(RUNS)/export/runner.py --out-dir $(RUNS)/generated_export \
		--num-images $(NUM_IMAGES) --seed 0 --overwrite
	$(call record,generated_export,$(NUM_IMAGES))
	touch $@

$(REPORT_EXPORT): $(GENERATED_EXPORT) $(REPORT) $$(call changed,report_export,$$(REPORT_FLAGS) $$(COMPRESSED_REPORT_FLAGS))
	rm -f $@
	$(call TIMER,report export) $(PYTHON) evaluate.py --real-path $(RUNS)/data/dataset.json \
		--generated-path $(RUNS)/generated_export/dataset.json --out-dir $(RUNS)/report_export \
		$(REPORT_CLASSIFIER) --device $(DEVICE) $(REPORT_FLAGS) $(COMPRESSED_REPORT_FLAGS)
	$(call record,report_export,$(REPORT_FLAGS) $(COMPRESSED_REPORT_FLAGS))
	touch $@

# Few-shot (seed 000): the transformers fine-tuned (--init-from) on FEWSHOT_COUNT held-out images of one
# class, then that class generated and compared with the class's other held-out images. The class is Dress for
# Fashion-MNIST; for another folder, a label of its own (FEWSHOT_LABEL=cats) or none: FEWSHOT_COUNT of its
# held-out images whatever their labels (a folder without labels has none).
FEWSHOT_LABEL ?= $(if $(filter /usr/share/datasets/fashion-mnist,$(SOURCE)),Dress)
FEWSHOT_COUNT ?= 66
FEWSHOT_STEPS ?= 30
FEWSHOT_IMAGES ?= 300
FEWSHOT := $(RUNS)/fewshot
fewshot: $(FEWSHOT)/report/DONE
	@echo "few-shot done: $(FEWSHOT)/generated (grid.png), report in $(FEWSHOT)/report/report.md"

$(FEWSHOT)/data/DONE: $(DATA) $$(call changed,fewshot,$$(FEWSHOT_LABEL) $$(FEWSHOT_COUNT) $$(FEWSHOT_STEPS) $$(FEWSHOT_IMAGES))
	rm -f $@
	$(PYTHON) build_dataset.py --source $(RUNS)/data/dataset.json $(if $(FEWSHOT_LABEL),--label "$(FEWSHOT_LABEL)") --from-split heldout \
		--train-count $(FEWSHOT_COUNT) --size $(SIZE) --out-dir $(FEWSHOT)/data --overwrite
	$(call record,fewshot,$(FEWSHOT_LABEL) $(FEWSHOT_COUNT) $(FEWSHOT_STEPS) $(FEWSHOT_IMAGES))
	touch $@

$(FEWSHOT)/fmaps/DONE: $(FEWSHOT)/data/DONE $(AUTOENCODER)
	$(PYTHON) generate_fmap_dataset.py --dataset-path $(FEWSHOT)/data/dataset.json --model-path $(AE_ARTIFACT) \
		--out-dir $(FEWSHOT)/fmaps --device $(DEVICE)
	touch $@

$(FEWSHOT)/transformers/%/DONE: $(FEWSHOT)/fmaps/DONE $(RUNS)/transformers/%/DONE
	rm -f $@
	$(call TIMER,fewshot $*) $(PYTHON) train_transformer.py $(if $(filter base,$*),--train-base-model) \
		--dataset-path $(FEWSHOT)/fmaps/dataset.json --decoder-path $(AE_ARTIFACT) \
		--lr-codebook-path $(call codebook,$(coarse_$*)) --hr-codebook-path $(call codebook,$(fine_$*)) \
		--init-from $(RUNS)/transformers/$*/model.safetensors --config-path $(call config,transformer_$*.json) \
		--out-dir $(FEWSHOT)/transformers/$* --batch-size 16 --max-steps $(FEWSHOT_STEPS) --max-epoch 1000 \
		$(TRAIN_FLAGS) $(RESTART)
	touch $@

# the preset's generation config with the fine-tuned models, the main run's codebooks and the class
$(FEWSHOT)/generated/DONE: $(MODELS:%=$(FEWSHOT)/transformers/%/DONE)
	rm -f $@
	$(call TIMER,fewshot generate) $(PYTHON) generate_images.py --config-path $(call config,generate.json) \
		$(call level_paths,$(FEWSHOT)/transformers) $(if $(FEWSHOT_LABEL),"--set=0.label=$(FEWSHOT_LABEL)") \
		--decoder-path $(DECODER_ARTIFACT) --out-dir $(FEWSHOT)/generated --num-images $(FEWSHOT_IMAGES) --seed 0 \
		--device $(DEVICE) $(RESTART)
	touch $@

$(FEWSHOT)/report/DONE: $(FEWSHOT)/generated/DONE $(REPORT)
	$(call TIMER,fewshot report) $(PYTHON) evaluate.py --real-path $(FEWSHOT)/data/dataset.json \
		--generated-path $(FEWSHOT)/generated/dataset.json --out-dir $(FEWSHOT)/report \
		$(REPORT_CLASSIFIER) --device $(DEVICE) $(call ceiling,$(AE_ARTIFACT),$(DECODER_ARTIFACT)) $(REPORT_FLAGS)
	touch $@

# The low-data benchmark: the whole chain trained from scratch on LOWDATA_PER_CLASS real training images of
# each class (the held-out split untouched), LOWDATA_IMAGES images generated, and the report, whose
# downstream section adds them to those same real images: the generator never sees more real images than
# the classifier it helps, and chooses its checkpoints on BENCH_VALIDATION_SHARE of them (the held-out split,
# where the accuracy is taken, is seen by no choice). Any setting passes on (make lowdata AE_STEPS=...).
BENCH_VALIDATION_SHARE ?= 0.1
LOWDATA_PER_CLASS ?= 100
LOWDATA_IMAGES ?= 10000
LOWDATA_RUNS ?= $(RUNS)_lowdata$(LOWDATA_PER_CLASS)
# LOWDATA_TARGET=sampling runs the sampling choice on that chain instead of the report
LOWDATA_TARGET ?= report
lowdata:
	$(MAKE) $(LOWDATA_TARGET) RUNS=$(LOWDATA_RUNS) DATA_FLAGS="--train-per-class $(LOWDATA_PER_CLASS)" NUM_IMAGES=$(LOWDATA_IMAGES) \
		VALIDATION_SHARE=$(BENCH_VALIDATION_SHARE) SAMPLING_CHOICE=fidelity \
		REPORT_FLAGS="--downstream-per-class $(LOWDATA_PER_CLASS) $(REPORT_FLAGS)"
	@echo "low-data benchmark done: $(LOWDATA_RUNS)/report/report.md (downstream accuracy), $(LOWDATA_RUNS)/timings.log"

# The transfer benchmark: the chain pre-trained on the Fashion-MNIST classes outside TRANSFER_LABELS (which
# it never sees), then tuned (INIT) on TRANSFER_PER_CLASS training images of each of them, and beside it the
# chain trained from scratch on those images alone; each generates TRANSFER_IMAGES images and reports on the
# target classes only (held out: the target classes' held-out images; checkpoints chosen on
# BENCH_VALIDATION_SHARE of the training images, as in lowdata). The targets are the three garments
# most often confused with each other, whose relatives (T-shirt/top, Coat, Dress) the source holds, and Bag,
# which has none.
TRANSFER_LABELS ?= Pullover Shirt Sneaker Bag
TRANSFER_PER_CLASS ?= 100
TRANSFER_IMAGES ?= 4000
TRANSFER_RUNS ?= $(RUNS)_transfer
# settings of the source chain alone (e.g. TRANSFER_SOURCE_FLAGS="CASCADE_STEPS=1200")
TRANSFER_SOURCE_FLAGS ?=
TRANSFER_TARGET = DATA_FLAGS="$(TRANSFER_LABELS:%=--label %) --train-per-class $(TRANSFER_PER_CLASS)" \
	NUM_IMAGES=$(TRANSFER_IMAGES) VALIDATION_SHARE=$(BENCH_VALIDATION_SHARE) SAMPLING_CHOICE=fidelity REPORT_FLAGS="--downstream-per-class $(TRANSFER_PER_CLASS) $(REPORT_FLAGS)"
transfer:
	$(MAKE) transformers RUNS=$(TRANSFER_RUNS)/source DATA_FLAGS="$(TRANSFER_LABELS:%=--exclude-label %)" \
		$(TRANSFER_SOURCE_FLAGS)
	$(MAKE) report RUNS=$(TRANSFER_RUNS)/tuned$(TRANSFER_PER_CLASS) INIT=$(TRANSFER_RUNS)/source $(TRANSFER_TARGET)
	$(MAKE) report RUNS=$(TRANSFER_RUNS)/scratch$(TRANSFER_PER_CLASS) $(TRANSFER_TARGET)
	$(PYTHON) bench/tables.py downstream $(TRANSFER_RUNS)/tuned$(TRANSFER_PER_CLASS) $(TRANSFER_RUNS)/scratch$(TRANSFER_PER_CLASS)
	$(PYTHON) bench/tables.py ceiling $(TRANSFER_RUNS)/tuned$(TRANSFER_PER_CLASS) $(TRANSFER_RUNS)/scratch$(TRANSFER_PER_CLASS)
	$(PYTHON) bench/tables.py timings $(TRANSFER_RUNS)/tuned$(TRANSFER_PER_CLASS)
	$(PYTHON) bench/tables.py timings $(TRANSFER_RUNS)/scratch$(TRANSFER_PER_CLASS)

bench: $(REPORT_COMPRESSED) $(EXPORT)
	$(PYTHON) bench/run.py --runs $(RUNS) --out $(RUNS)/bench.json --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE))
	$(PYTHON) bench/export.py --runs $(RUNS) --bundle $(RUNS)/export --out $(RUNS)/bench_export.json

# generation's images/s and share of the matmul peak per batch size, and runs of 10,000 and 100,000 images
bench-generation: $(GENERATED)
	$(PYTHON) bench/generation.py --runs $(RUNS) --out $(RUNS)/bench_generation.json --device $(if $(filter auto,$(DEVICE)),cpu,$(DEVICE))

# every stage of a small chain (2,000 training images, about a tenth of the preset's steps) timed from a clean
# folder, so that a stage that got slower shows: its stage table, from $(BENCH_CHAIN_RUNS)/timings.log
BENCH_CHAIN_RUNS ?= $(RUNS)_bench_chain
bench-chain:
	rm -rf $(BENCH_CHAIN_RUNS)
	$(MAKE) demo RUNS=$(BENCH_CHAIN_RUNS) DATA_FLAGS="--limit 2000" AE_STEPS=400 CB_STEPS=100 BASE_STEPS=300 \
		CASCADE_STEPS=300 NUM_IMAGES=200 REPORT_FLAGS="--downstream-steps 100 --downstream-seeds 1"
	$(PYTHON) bench/tables.py stages $(BENCH_CHAIN_RUNS)

clean-demo:
	rm -rf $(RUNS)

# Prompts (make captions): a captioned test set drawn by recipes/captioned_shapes.py (32x32 scenes of a shape
# of some colour, size and place, each with its caption; some colour-shape pairs never drawn), the chain on it
# with the captions32 preset (its base and cascade models read the captions), models without captions beside them (the
# label-conditioned reference), images for the prompts of every seen and unseen combination without and with
# guidance, and a report for each (prompt agreement; Fréchet distance against the reference's).
CAPTIONS_RUNS ?= runs/captions32
CAPTIONS_COUNT ?= 6000
CAPTIONS_PER_PROMPT ?= 14
CAPTIONS_GUIDANCE ?= 1.5
captions:
	$(MAKE) PRESET=captions SIZE=32 CHANNELS=3 RUNS=$(CAPTIONS_RUNS) SOURCE=$(CAPTIONS_RUNS)/source/images \
		CAPTIONS_SOURCE=$(CAPTIONS_RUNS)/source captions-reports

ifdef CAPTIONS_SOURCE
$(CAPTIONS_SOURCE)/DONE: | setup
	rm -rf $(CAPTIONS_SOURCE)/images
	mkdir -p $(RUNS)
	$(call TIMER,captioned scenes) $(PYTHON) recipes/captioned_shapes.py --out-dir $(CAPTIONS_SOURCE) \
		--count $(CAPTIONS_COUNT)
	touch $@
$(DATA): $(CAPTIONS_SOURCE)/DONE
endif

CAPTION_REPORTS := $(foreach g,g1 guided,$(foreach s,seen unseen,$(RUNS)/report_prompts_$(s)_$(g)/DONE))
# kept, so that a rerun after a model changed knows to start the prompt sets over
.SECONDARY: $(subst report_prompts_,prompts_,$(CAPTION_REPORTS))
captions-reports: $(RUNS)/report_label/DONE $(CAPTION_REPORTS)
	@echo "captions done: prompt agreement in $(RUNS)/report_prompts_*/report.md (grids: $(RUNS)/prompts_*/grid.png),"
	@echo "the reference without captions in $(RUNS)/report_label/report.md"

$(RUNS)/generated_label/DONE: $(RUNS)/transformers/base_label/DONE $(RUNS)/transformers/cascade_label/DONE
	rm -f $@
	$(call TIMER,generate label) $(PYTHON) generate_images.py --config-path $(call config,generate.json) \
		$(call level_paths,$(RUNS)/transformers,$(MODELS:%=%_label)) \
		--decoder-path $(AE_ARTIFACT) --out-dir $(RUNS)/generated_label --num-images $(NUM_IMAGES) --seed 0 \
		--device $(DEVICE) $(RESTART)
	touch $@

$(RUNS)/report_label/DONE: $(RUNS)/generated_label/DONE
	rm -f $@
	$(call TIMER,report label) $(PYTHON) evaluate.py --real-path $(RUNS)/data/dataset.json \
		--generated-path $(RUNS)/generated_label/dataset.json --out-dir $(RUNS)/report_label --device $(DEVICE) \
		$(REPORT_FLAGS)
	touch $@

# g1: guidance scale 1 (plain conditional); guided: CAPTIONS_GUIDANCE at every level
guidance_g1 := 1.0
guidance_guided = $(CAPTIONS_GUIDANCE)
$(RUNS)/prompts_%/DONE: $(RUNS)/transformers/base/DONE $(RUNS)/transformers/cascade/DONE
	rm -f $@
	$(call TIMER,generate prompts $*) $(PYTHON) generate_images.py --config-path $(call config,generate.json) \
		$(call level_paths,$(RUNS)/transformers) $(LEVEL_INDEX:%=--set=%.guidance_scale=$(guidance_$(lastword $(subst _, ,$*)))) \
		--decoder-path $(AE_ARTIFACT) --out-dir $(RUNS)/prompts_$* --num-images $(CAPTIONS_PER_PROMPT) --seed 0 \
		--prompts-file $(CAPTIONS_SOURCE)/prompts_$(firstword $(subst _, ,$*)).txt --device $(DEVICE) $(RESTART)
	touch $@

# the label classifier of the reference's report, and the word classifier of the first prompt report, reused;
# no downstream section: a prompt set is not drawn to the data's class balance, and the reference's report has it
$(RUNS)/report_prompts_%/DONE: $(RUNS)/prompts_%/DONE $(RUNS)/report_label/DONE
	rm -f $@
	mkdir -p $(RUNS)/report_prompts_$*
	cp $(RUNS)/report_prompts_seen_g1/prompt_classifier.safetensors $(RUNS)/report_prompts_$*/ 2>/dev/null || true
	$(call TIMER,report prompts $*) $(PYTHON) evaluate.py --real-path $(RUNS)/data/dataset.json \
		--generated-path $(RUNS)/prompts_$*/dataset.json --out-dir $(RUNS)/report_prompts_$* \
		--classifier-path $(RUNS)/report_label/classifier.safetensors --device $(DEVICE) --no-downstream $(REPORT_FLAGS)
	touch $@
