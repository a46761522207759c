"""The top layer: the Hydra entry point, the run loop (plan → batch → engine → outputs) and start-up."""
