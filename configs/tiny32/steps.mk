# tiny preset, 32 x 32 images: minutes on a 2-core CPU. A stage stops at its step count or its epoch count,
# whichever comes first: a large dataset is bounded by the steps, a small one by the epochs. Any of these can
# be set on the command line (make demo AE_STEPS=8000).
AE_STEPS ?= 4000
AE_EPOCHS ?= 150
CB_STEPS ?= 1000
CB_EPOCHS ?= 30
CB_BATCH ?= 128
BASE_STEPS ?= 3000
BASE_EPOCHS ?= 20
CASCADE_STEPS ?= 3000
CASCADE_EPOCHS ?= 20
# the decoder fine-tuned, with the adversarial loss, to decode the finest codebook's quantized maps (decoder.json)
DECODER_STEPS ?= 1000
DECODER_EPOCHS ?= 70
BATCH ?= 64
CHECKPOINT_STEP ?= 250
