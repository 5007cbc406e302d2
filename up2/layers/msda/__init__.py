"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3), the hot op of
the proposal network (paper §4.1 / App. A).

Shape shorthand (see ``up2.structures``):
    N   images                  Lq  queries
    S   flattened pixels over all levels (sum_l h_l * w_l)
    L   feature levels          M   attention heads      Dh  channels per head (C / M)
    P   sampling points per head and level               C   embedding width

For every query q, head m: ``out[q, m] = sum_{l, p} A[q, m, l, p] * V_l^m(loc[q, m, l, p])``
where ``V_l^m`` is level l of the value of head m, sampled bilinearly at a normalised (x, y)
location in [0, 1] (pixel centres at (i + 0.5) / size, zero outside the map), and ``A`` is
softmax-normalised over (l, p).

One idea per file:

* ``module``: ``MSDeformAttn``, the ``nn.Module`` (projections, reference points, validation
  of its inputs).
* ``function``: ``ms_deform_attn_core``, the single entry point of the op, and the autograd
  Functions of the compiled CPU kernel and of the Triton kernels.
* ``routing``: which path runs for which device (``UP2_MSDA_PATH`` = ``auto`` | ``pytorch`` |
  ``compiled`` | ``triton`` | ``compiled_reference``), logged once per path and device type.
* ``reference``: the vectorised pure-PyTorch op (one ``F.grid_sample`` per level), the
  numerical reference; it runs where no kernel does (CPU without the built kernel, CUDA
  without triton, other devices).
* ``triton_kernels``: the Triton forward and backward kernels, the path of CUDA tensors
  (imported only when used; on CPU tensors under ``TRITON_INTERPRET=1`` for tests), with
  fixed or autotuned launch configurations.
* ``library``: loading the compiled C++ CPU kernel (``csrc/ms_deform_attn_cpu.cpp``,
  float32 / float64; bf16 / fp16 inputs are computed in float32), built by
  ``python -m up2.layers.build_kernels msda``; ``fast_path_available()`` says whether it loads.
* ``checks``: shape validation of the op's inputs.
"""
from .function import ms_deform_attn_core
from .library import fast_path_available
from .module import MSDeformAttn
from .reference import ms_deform_attn_core_pytorch
from .routing import PATH_ENV

__all__ = ["MSDeformAttn", "PATH_ENV", "fast_path_available", "ms_deform_attn_core", "ms_deform_attn_core_pytorch"]
