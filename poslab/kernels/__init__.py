"""Fast attention kernels: kernelized attention with a Toeplitz relative-position term."""

from poslab.kernels.fft_rpe import (
    fft_length,
    kernelized_rpe_attention,
    kernelized_rpe_attention_reference,
    toeplitz_matmul,
)

__all__ = ["kernelized_rpe_attention", "kernelized_rpe_attention_reference", "toeplitz_matmul", "fft_length"]
