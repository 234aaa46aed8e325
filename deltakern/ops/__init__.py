"""The compiled kernels' Python side: the guarded loader of the C++/CUDA extension, the one
registration module of its custom ops (fake kernels, autograd, call wrappers) and the Triton
kernels (``ops.triton``, imported lazily)."""
