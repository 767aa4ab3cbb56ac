"""GPU tooling around the Pallas kernels: build them for CUDA on any host (`cuda_build`),
report their machine code (`report`), and check/time the engine's launches on a GPU
(`selfcheck`). Kept out of `pallas_kernels/`, which holds generic array ops only."""
