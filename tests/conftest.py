"""
Session setup shared by every test file: how the Triton kernels of kernels.py get tested on CPU.

Triton decides when a kernel is decorated (when kernels.py is imported) whether it is compiled
for a GPU or run by its numpy interpreter, from TRITON_INTERPRET. This file is imported by pytest
before any test module, so setting the variable here works whatever order the tests run in.
  - No CUDA GPU and TRITON_INTERPRET unset: set TRITON_INTERPRET=1, so tests/test_kernels.py can
    run the Triton kernels (forward and backward) on CPU tensors.
  - kernels.CPU_BACKEND is then pinned to "torch": by default CPU tensors keep using the fast
    PyTorch references, so model and training tests never pay for the (~1000x slower)
    interpreter. Kernel tests opt in with `with kernels.backend("triton"):`.
  - With a GPU the variable is left alone: CUDA tensors run the compiled kernels, with fixed
    blocks (kernels.AUTOTUNE = False) so the suite does not spend minutes autotuning every shape;
    test_autotuned_kernels_on_gpu turns autotuning back on for the benchmark's shapes.
  - An explicit TRITON_INTERPRET=0 is respected (the kernel tests then skip on CPU).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import kernels  # noqa: E402  (must follow the environment setup above)

kernels.CPU_BACKEND = "torch"
kernels.AUTOTUNE = False


def _transformers_without_hub_kernels():
    """transformers >= 5.25 depends on Hugging Face's `kernels` package (kernels downloaded from
    the Hub) and imports it by that name when it loads a model, which finds this repository's
    kernels.py (already imported above) and fails with `cannot import name 'CUDAProperties' from
    'kernels'`. The tests compare against transformers' plain PyTorch Llama and never ask for hub
    kernels, so transformers is told they are absent (USE_HUB_KERNELS=NO: from_pretrained would
    otherwise default to use_kernels=True). Imports only transformers.utils (~0.3 s)."""
    os.environ["USE_HUB_KERNELS"] = "NO"
    try:
        import transformers.utils as utils
        import transformers.utils.import_utils as import_utils
    except ImportError:  # transformers is a test-only dependency: its tests skip
        return
    absent = lambda *args, **kwargs: False  # noqa: E731
    utils.is_kernels_available = import_utils.is_kernels_available = absent


_transformers_without_hub_kernels()
