"""Numerical precision modes shared by training and sampling.

    fp32   float32 everywhere, TF32 off: the reference codebases' maths (bit-for-bit comparable runs).
    tf32   float32 tensors, TF32 tensor cores for matmul/conv on Ampere+ GPUs (10-bit mantissa products).
    bf16   autocast to bfloat16 for the network's matmuls/convs; losses, σ, preconditioning and the sampler's
           ODE state stay float32/float64.
    fp16   the reference's --fp16: the network itself computes in float16 on CUDA (use_fp16=True), with loss
           scaling (--ls) to keep gradients in range.
"""

import contextlib

import torch

PRECISIONS = ('fp32', 'tf32', 'bf16', 'fp16')


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    return precision


def configure_backends(precision):
    """Set the process-wide TF32 switches for `precision` (they only matter on CUDA)."""
    check_precision(precision)
    allow_tf32 = precision != 'fp32'
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def autocast(precision, device):
    """Context manager for the network's forward pass under `precision` (a no-op except for bf16)."""
    check_precision(precision)
    if precision == 'bf16':
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
