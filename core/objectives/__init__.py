"""Each trained model's data and objective (batch, loss, held-out evaluation), shared by its training
stage and the compression stage."""
