# captions preset, 32 x 32 colour scenes with captions (recipes/captioned_shapes.py; make captions): a smaller
# autoencoder and cascade model than tiny32's (the scenes are flat shapes on white) and fewer steps, so that
# the whole captioned run stays well under an hour on a 2-core CPU. Any of these can be set on the command line.
AE_STEPS ?= 800
AE_EPOCHS ?= 100
CB_STEPS ?= 300
CB_EPOCHS ?= 30
CB_BATCH ?= 128
BASE_STEPS ?= 1500
BASE_EPOCHS ?= 40
CASCADE_STEPS ?= 1000
CASCADE_EPOCHS ?= 40
BATCH ?= 64
CHECKPOINT_STEP ?= 250
