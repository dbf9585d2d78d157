"""Faster executors of :func:`~grl_plugin.layers.attention.cosine_attention`, one module per
device family, entered only from its dispatch: :mod:`.cpu` (CPU tensors) and :mod:`.sdpa`
(PyTorch's fused attention, for CUDA and as the shared base)."""
