"""Attach cross-attention blocks in front of decoder layers without touching the decoder.

The blocks run in forward pre-hooks of the chosen decoder layers. The decoder's modules,
parameters and state-dict keys stay exactly those of the original LlamaForCausalLM, so any
Llama checkpoint loads into it as is, and `save_pretrained` still writes a plain Llama.
The blocks themselves are owned (registered, saved, trained) by the composite model.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from adapters.cross_attention import CrossAttentionBlock, MediaContext


class CrossAttentionFusion:
    """Routes hidden states through named groups of blocks before chosen decoder layers.

    Example:
        fusion = CrossAttentionFusion(decoder.model.layers)
        fusion.add("image", image_blocks, layer_indices=[3, 7, 11])
        with fusion.media(image=context):
            decoder(inputs_embeds=...)

    Groups run in the order they were added; a group without a context in the current
    `media(...)` scope is skipped, so text-only calls cost one dictionary lookup per layer.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self._at: dict[int, list[tuple[str, CrossAttentionBlock]]] = {}
        self._contexts: dict[str, MediaContext] = {}
        self._handles = []

    def add(self, name: str, blocks: Sequence[CrossAttentionBlock], layer_indices: Sequence[int]) -> None:
        if len(blocks) != len(layer_indices):
            raise ValueError(f"{name}: {len(blocks)} blocks for {len(layer_indices)} layer positions")
        for block, index in zip(blocks, layer_indices):
            if index not in self._at:
                self._at[index] = []
                self._handles.append(
                    self.layers[index].register_forward_pre_hook(self._hook(index), with_kwargs=True)
                )
            self._at[index].append((name, block))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._at = [], {}

    @contextmanager
    def media(self, **contexts: MediaContext | None) -> Iterator[None]:
        active = {name: ctx for name, ctx in contexts.items() if ctx is not None}
        previous, self._contexts = self._contexts, active
        try:
            yield
        finally:
            self._contexts = previous

    def run(self, index: int, x: Tensor) -> Tensor:
        """x [b, q, d] through the blocks before decoder layer `index` that have a context now
        (what the hook does; callable directly by code that steps through the layers itself)."""
        for name, block in self._at.get(index, ()):
            context = self._contexts.get(name)
            if context is not None:
                x = block(x, context)
        return x

    def active(self, index: int) -> list[tuple[CrossAttentionBlock, MediaContext]]:
        """The blocks before decoder layer `index` that have a context in the current scope."""
        return [(block, self._contexts[name]) for name, block in self._at.get(index, ()) if name in self._contexts]

    def _hook(self, index: int):
        def run_blocks(module: nn.Module, args: tuple, kwargs: dict):
            if not self._contexts:
                return None
            x = self.run(index, args[0] if args else kwargs["hidden_states"])
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return run_blocks
