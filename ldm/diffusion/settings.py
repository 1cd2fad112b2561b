"""`SamplerSettings`: how a trained model is sampled, the one place for the sampling defaults.

`LatentDiffusion.generate`, `sample.py`, the training callbacks (grid, periodic evaluation), `evaluate.py`,
the factor-comparison report and the diffusers export all take one of these whole; the Hydra `sampling`
config group (configs/sampling/) builds it. The defaults are Stable Diffusion's inference settings
(its DDIM scheduler config): DDIM 50 steps, "leading" spacing with steps_offset 1, no guidance rescale;
guidance scale 5.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from ldm.diffusion.samplers import SAMPLERS, TIMESTEP_SPACINGS

# Settings the pipeline applies around the sampler rather than passing to it.
PIPELINE_ONLY = ("seed", "keep_known", "pixel_consistency")


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler, grid and guidance of one sampling run; `seed` seeds sample i with seed + i.

    `timestep_spacing` / `steps_offset` place the timestep grid (`ldm.diffusion.samplers.spaced_timesteps`;
    "trailing" starts at t = T - 1, which a zero-terminal-SNR model needs to start from pure noise, Lin et
    al. 2024 Sec. 3.3). `guidance_rescale` is Lin et al.'s phi (Sec. 3.4; 0 = off, they use 0.7). `keep_known`
    (inpainting only): after every step the latent cells outside the mask are reset to the known image's latent
    at that step's noise level (`ldm.diffusion.samplers.impose_known`); false samples from the model alone.
    `pixel_consistency` (inpainting and SR): the decoded image is projected onto what its condition fixes, the
    known pixels pasted back or the low-res input back-projected (`ldm.diffusion.consistency`); false returns the
    decoder's output as it is."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 5.0
    seed: int = 0
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    guidance_rescale: float = 0.0
    keep_known: bool = True
    pixel_consistency: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {self.sampler!r}. Choose one of: {', '.join(SAMPLERS)}.")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"Unknown timestep_spacing {self.timestep_spacing!r}. Choose one of: "
                             f"{', '.join(TIMESTEP_SPACINGS)}.")
        if not (self.cfg_scale >= 1 or self.cfg_scale == 0):  # also refuses NaN
            raise ValueError(
                f"cfg_scale={self.cfg_scale}: classifier-free guidance takes cfg_scale >= 1 (1: conditional only, one "
                "forward per step; larger: stronger guidance, 3-7 is usual) or 0 (unconditional samples). Values "
                "below 1 weaken the condition, and negative ones push the samples away from it.")
        if int(self.steps) < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}.")
        if self.eta != 0.0 and self.sampler != "ddim":
            raise ValueError(f"eta only applies to the 'ddim' sampler; got eta={self.eta} with sampler={self.sampler}.")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1] (0: off; Lin et al. use 0.7), got {self.guidance_rescale}.")

    @classmethod
    def of(cls, settings: SamplerSettings | Mapping[str, Any] | None = None, **overrides: Any) -> SamplerSettings:
        """Settings from an instance, a mapping (a `sampling` config node) or None (the defaults), with
        `overrides` applied. An unknown key is an error naming the valid ones (a typo never goes unnoticed)."""
        if settings is None:
            settings = cls()
        elif not isinstance(settings, cls):
            settings = cls(**_known_keys(dict(settings)))
        return replace(settings, **_known_keys(overrides)) if overrides else settings

    def sample_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `ldm.diffusion.samplers.sample` these settings fix (not the seed: it
        becomes the per-sample generators)."""
        return {key: value for key, value in asdict(self).items() if key not in PIPELINE_ONLY}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _known_keys(values: dict[str, Any]) -> dict[str, Any]:
    valid = {field.name for field in fields(SamplerSettings)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {unknown}; valid keys are: {', '.join(sorted(valid))}.")
    return values
