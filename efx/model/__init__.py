"""The models efx works on: the architecture map (blocks, targets, LoRA parts), loading,
`SparseLoRALinear` and its packed checkpoints."""
