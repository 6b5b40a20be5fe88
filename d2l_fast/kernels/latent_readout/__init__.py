"""Fused latent cross-attention readout (one Perceiver cross-attention layer over a packed context)."""
from .configs import ReadoutProblem, choose_mode, readout_macs
from .function import LatentReadoutFunction, latent_readout
from .reference import latent_readout_ref, rms_normalize_ref
from .torch_impl import compute_rstd

__all__ = [
    "latent_readout",
    "LatentReadoutFunction",
    "latent_readout_ref",
    "rms_normalize_ref",
    "compute_rstd",
    "readout_macs",
    "choose_mode",
    "ReadoutProblem",
]
