# tiny preset, 128 x 128 images: three down-samplings to a 16 x 16 feature map and one more cascade level (256 tokens, trained on
# sliding windows of 64). A stage stops at its step count or its epoch count, whichever comes first.
AE_STEPS ?= 4000
AE_EPOCHS ?= 40
CB_STEPS ?= 1000
CB_EPOCHS ?= 30
CB_BATCH ?= 128
BASE_STEPS ?= 3000
BASE_EPOCHS ?= 20
CASCADE_STEPS ?= 2000
CASCADE_EPOCHS ?= 15
BATCH ?= 32
CHECKPOINT_STEP ?= 250
