"""Pure `nn.Module`s: they know nothing of Lightning or Hydra."""
