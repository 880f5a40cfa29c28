# The activation modes (mer.kernels.matmul.packing), here so that the CLI and the config can
# check a mode without importing the kernels (numba is slow to import).
ACTIVATIONS = ("f32", "q8")
