"""Numerical precision modes and the fast-path plumbing shared by training, sampling and the benchmark.

    fp32   float32 everywhere, TF32 off: the reference codebases' maths (bit-for-bit comparable runs).
    tf32   float32 tensors, TF32 tensor cores for matmul/conv on Ampere+ GPUs (10-bit mantissa products).
    bf16   autocast to bfloat16 for the network's matmuls/convs; losses, σ, preconditioning and the sampler's
           ODE state stay float32/float64.
    fp16   the reference's --fp16: the network itself computes in float16 on CUDA (use_fp16=True), with loss
           scaling (--ls) to keep gradients in range. TF32 stays off, as in the reference.
    bf16-native
           fp16's path with bfloat16: the U-Net's activations are bfloat16 end to end (no autocast, so no float32
           round trips around normalisations and residual additions), weights float32 and cast per layer, no
           loss scaling needed (bfloat16 has float32's exponent range). Coarser than bf16 autocast: the residual
           stream is rounded to 8 significant bits at every block.

`NetworkCall` is how a loss or a sampler calls the network under a mode: autocast around the network call only
(never around AugmentPipe's resampling matrices or the PFGM++ noise), optionally through torch.compile.
"""

import contextlib

import torch

PRECISIONS = ('fp32', 'tf32', 'bf16', 'fp16', 'bf16-native')

# Defaults of --precision, chosen from measurements on an H100 (docs/benchmarks.md). Training: bf16, 2.9× the
# reference's fp32 speed with the loss within 0.15 % of fp32 (as close as tf32). Sampling: tf32, 3.0× with a
# 10× smaller deviation from fp32 than bf16 at nearly the same speed (FID is computed from these samples).
# On the CPU, where bf16 is emulated and TF32 does not exist, both are fp32.
DEFAULT_CUDA_PRECISION = {'train': 'bf16', 'sample': 'tf32'}
DEFAULT_HELP = {'train': 'bf16 on CUDA GPUs, fp32 on the CPU', 'sample': 'tf32 on CUDA GPUs, fp32 on the CPU'}


def default_precision(device, purpose):
    """The measured default for `purpose` ('train' or 'sample') on `device`."""
    device = torch.device(device)
    if device.type != 'cuda':
        return 'fp32'
    choice = DEFAULT_CUDA_PRECISION[purpose]
    if choice == 'bf16' and not torch.cuda.is_bf16_supported():
        return 'tf32'  # pre-Ampere GPUs: no fast bf16 (and tf32 falls back to plain fp32 there)
    return choice


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    return precision


def configure_backends(precision):
    """Set the process-wide TF32 switches for `precision` (they only matter on CUDA)."""
    check_precision(precision)
    # Only tf32. bf16 autocasts the network's matmuls/convs itself; what runs outside autocast (AugmentPipe's
    # resampling matrices, the loss) stays true float32. fp16 is the reference's --fp16, which had TF32 off.
    allow_tf32 = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def autocast(precision, device):
    """Context manager for the network's forward pass under `precision` (a no-op except for bf16)."""
    check_precision(precision)
    if precision == 'bf16':
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_kwargs(compile):
    """torch.compile arguments for a `compile` setting: False/None (no compile), True (inductor), or a dict of
    torch.compile arguments (e.g. {'backend': 'aot_eager'} on the CPU, {'mode': 'reduce-overhead'} for CUDA
    graphs). Shapes are static (dynamic=False): the training step and the sampler call the network with one
    batch shape, and σ travels as a tensor, so nothing recompiles from step to step."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return dict(dynamic=False)
    if isinstance(compile, dict):
        return dict(dict(dynamic=False), **compile)
    raise ValueError(f'compile must be a bool or a dict of torch.compile arguments, got {compile!r}')


def activation_dtype(precision):
    """The dtype a mode asks the network's activations to be in (None: the network decides, see
    networks._Preconditioner.forward: float32, or float16 under use_fp16)."""
    return torch.bfloat16 if check_precision(precision) == 'bf16-native' else None


class NetworkCall:
    """Calls the network (or `callee`, the DDP wrapper around it) under a precision mode, optionally compiled.

    Reads of any other attribute (D, sigma_min, round_sigma, img_channels, parameters, ...) go to the plain
    network, so a loss or a sampler takes a NetworkCall wherever it takes a network. torch.compile wraps only
    the call: the network's own state_dict keeps its names (no `_orig_mod.` prefix).
    """

    def __init__(self, network, precision='fp32', compile=False, callee=None):
        self.network = network
        self.precision = check_precision(precision)
        self.callee = callee if callee is not None else network  # e.g. DistributedDataParallel(network)
        kwargs = compile_kwargs(compile)
        self.compiled = kwargs is not None
        # CUDA graphs reuse their output buffers: mark a new step before each call (callers consume the output
        # at once, e.g. the sampler's .to(float64) copy).
        self._mark_step = self.compiled and kwargs.get('mode') in ('reduce-overhead', 'max-autotune')
        self._call = torch.compile(self.callee, **kwargs) if self.compiled else self.callee
        self._activation_dtype = activation_dtype(precision)

    def __call__(self, x, *args, **kwargs):
        if self._mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        if self._activation_dtype is not None:
            kwargs = dict(kwargs, activation_dtype=self._activation_dtype)
        with autocast(self.precision, x.device):
            return self._call(x, *args, **kwargs)

    def __getattr__(self, name):
        # Unset attributes (during copy/pickle) must not recurse into self.network.
        if name.startswith('__') or name in ('network', 'callee', '_call', '_activation_dtype'):
            raise AttributeError(name)
        return getattr(self.network, name)
