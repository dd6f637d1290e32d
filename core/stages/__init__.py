"""One module per pipeline stage, each the same shape: an args dataclass and run(args); the training stages build an Objective for the shared Trainer."""
