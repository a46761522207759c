"""ControlNet guide images → hint images and the hint tensor the ControlNet reads."""
