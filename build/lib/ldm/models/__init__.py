"""The two LightningModules (they only wire nets, objective and optimiser), the autoencoder loss, conditioners."""
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.latent_diffusion import LatentDiffusion

__all__ = ["AutoencoderKL", "LatentDiffusion"]
