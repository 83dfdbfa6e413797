"""The one GAN training loop every method uses."""
