"""Tensor parallelism: one process per rank, the scheduler on rank 0 sending each step to the others.

`group` joins the ranks (gloo on CPU, NCCL on CUDA), `layers` holds the column- and row-parallel linears the
backbones use when a model is split, `sharding` says which part of each checkpoint tensor a rank reads,
`step` is what rank 0 sends per forward, `worker` is a worker process's main loop, and `workers` / `launch`
are rank 0's side: start the workers, send them steps, notice when one dies. Nothing here is imported at
tensor-parallel size 1 except the layer classes' module.
"""
