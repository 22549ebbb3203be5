"""Training: objective, optimizer, checkpoints, the UNet loop and the autoencoder (stage 1) loop."""
