"""Text-prompted medical image segmentation: BoltzFormer (Boltzmann-sampled masked attention) and its baselines."""
