"""The adapter manager: loads adapters into slots, stacks their weights into every wrapped layer, and
prepares each forward pass's routing (kernel choice and gate tensors) from the rows' mixtures."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from experts.multi_lora.fused import FusedLowBit, SiblingSlice
from experts.multi_lora.layers import InputGroup, MultiLoraLinear
from experts.multi_lora.metadata import GateState, LoraKernel, Mixture, SlotMixture, choose_kernel
from experts.quant import APPENDABLE_MODES, layer_mode, quantize_linear, wide_mode

if TYPE_CHECKING:  # annotations only: importable without pydantic-settings (bench.gpu_check on a bare GPU box)
    from experts.adapters import LoraWeights

logger = logging.getLogger(__name__)

STACKED_MAX_COLUMNS = 128
"""Stack every slot (no copy) while slots x rank stays at or below this many columns."""
COMPACT_MAX_COLUMNS = 256
"""Above that, stack only the slots the batch uses while they take at most this many columns; else gather."""

SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that read the same input tensor (Llama, Mistral, Qwen, ... naming)."""


class MultiLoraModel:
    """Holds many LoRA adapters on one backbone in slots and routes each batch row to its mixture."""

    def __init__(
        self, model: nn.Module, stacked_max_columns: int = STACKED_MAX_COLUMNS,
        compact_max_columns: int = COMPACT_MAX_COLUMNS, quant: str = "none",
    ) -> None:
        """`quant` ('none' or 'fp16'; experts.quant): the low-bit copy that routed passes read for every
        linear layer, LM head included. The fp32 weights stay: passes outside `routing` (router features, a plain
        forward) compute what they did."""
        self.model = model
        self.state = GateState()
        self.stacked_max_columns = stacked_max_columns
        self.compact_max_columns = compact_max_columns
        self.layers: dict[str, MultiLoraLinear] = {}
        self.groups: list[InputGroup] = []
        self.slots: list[LoraWeights | None] = []
        self._slot_index: dict[str, int] = {}
        self._compacted: tuple[int, ...] | None = None  # the slots the compact stacks hold now
        self.rank = 0
        self._reference = next(model.parameters())  # device and dtype of the backbone
        self.quant = quant
        if quant != "none":
            self._quantize(quant)

    # ---- adapters ----------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return [w.name for w in self.slots if w is not None]

    def slot_of(self, name: str) -> int:
        return self._slot_index[name]

    def _wrap(self, path: str) -> MultiLoraLinear:
        if path in self.layers:
            return self.layers[path]
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        base = getattr(parent, child)
        previous = base if isinstance(base, MultiLoraLinear) else None
        if previous is not None:  # a wrapper of an earlier MultiLoraModel on this model: this one takes over
            base = previous.base
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{path} is not nn.Linear")
        layer = MultiLoraLinear(base, self.state)
        if previous is not None and previous.quant is not None and previous.quant.mode == self._layer_mode(base):
            layer.quant = previous.quant  # packing takes seconds; the fp32 weights it was packed from are the same
        setattr(parent, child, layer)
        self.layers[path] = layer
        return layer

    def _quantize(self, mode: str) -> None:
        """Wrap every linear layer (LM head included: a fifth of SmolLM2's bytes per step) and give it a low-bit
        copy; layers no adapter targets get no LoRA stack (see _rebuild)."""
        wrapped: set[str] = set()
        paths = []
        for path, module in self.model.named_modules():  # parents come before their children
            if isinstance(module, MultiLoraLinear):
                wrapped.add(path)
                paths.append(path)
            elif isinstance(module, nn.Linear) and path.rpartition(".")[0] not in wrapped:
                paths.append(path)
        layers = [self._wrap(path) for path in paths]
        for group in self._make_groups(paths):  # siblings on one input share one stacked copy (fused.py)
            members = [self.layers[p] for p in group]
            if any(layer.quant is not None for layer in members):
                continue  # copies taken over from an earlier wrapper (_wrap)
            modes = {self._layer_mode(layer.base) for layer in members}
            fusable = len(members) > 1 and len(modes) == 1 and len({layer.base.bias is None for layer in members}) == 1
            if fusable or (len(members) == 1 and modes <= set(APPENDABLE_MODES)):  # a lone layer for A to ride on
                mode = modes.pop()
                fused = FusedLowBit([layer.base for layer in members], mode, wide_mode(mode))
                for layer, part in zip(members, fused.members(), strict=True):
                    layer.quant = part
        for layer in layers:
            if layer.quant is None:
                layer.quant = quantize_linear(layer.base, self._layer_mode(layer.base))

    def _layer_mode(self, base: nn.Linear) -> str:
        """This model's low-bit kernel for `base` (the LM head may take a wider one: experts.quant.HEAD_MODE)."""
        head = self.model.get_output_embeddings()
        return layer_mode(self.quant, base is (head.base if isinstance(head, MultiLoraLinear) else head))

    def quantized_bytes(self) -> int:
        """Weight bytes a quantized pass reads for the linear layers (0 when not quantized)."""
        copies = {}  # fused siblings share one copy
        for layer in self.layers.values():
            if layer.quant is not None:
                owner = getattr(layer.quant, "fused", layer.quant)
                copies[id(owner)] = owner.nbytes  # a narrow pass's read (a wide copy on AMX: wide_bytes)
        return sum(copies.values())

    def wide_bytes(self) -> int:
        """Bytes of the second copies wide passes read on an AMX CPU (experts.quant.WIDE_MODE; 0 elsewhere)."""
        return sum(fused.wide.nbytes for fused in self._fused_copies() if fused.wide is not None)

    def _fused_copies(self) -> list[FusedLowBit]:
        """Each shared low-bit copy once (its members all point at it)."""
        slices = [layer.quant for layer in self.layers.values() if isinstance(layer.quant, SiblingSlice)]
        return list({id(part.fused): part.fused for part in slices}.values())

    def add_adapter(self, weights: LoraWeights) -> int:
        """Load (or replace) an adapter; returns its slot. Rebuilds the stacks of every layer (~ms)."""
        with contextlib.suppress(KeyError):
            self.slots[self.slot_of(weights.name)] = None
        free = next((i for i, w in enumerate(self.slots) if w is None), None)
        if free is None:
            self.slots.append(weights)
            free = len(self.slots) - 1
        else:
            self.slots[free] = weights
        for path in weights.modules:
            self._wrap(path)
        self._rebuild()
        return free

    def remove_adapter(self, name: str) -> None:
        self.slots[self.slot_of(name)] = None
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        self._rebuild()

    def _make_groups(self, paths: Sequence[str]) -> list[list[str]]:
        """Wrapped layers grouped by shared input: known sibling sets under one parent; the rest alone."""
        by_parent: dict[str, dict[str, str]] = {}
        for path in paths:
            parent, _, child = path.rpartition(".")
            by_parent.setdefault(parent, {})[child] = path
        groups: list[list[str]] = []
        for children in by_parent.values():
            taken: set[str] = set()
            for names in SHARED_INPUT_GROUPS:
                members = [children[n] for n in names if n in children]
                widths = {self.layers[p].in_features for p in members}
                if len(members) > 1 and len(widths) == 1:
                    groups.append(members)
                    taken.update(members)
            groups += [[p] for p in children.values() if p not in taken]
        return groups

    def _rebuild(self) -> None:
        self._slot_index = {w.name: i for i, w in enumerate(self.slots) if w is not None}
        self._compacted = None  # set_stack drops the compact stacks
        live = [w for w in self.slots if w is not None]
        self.rank = max((w.rank for w in live), default=0)
        # Only layers some loaded adapter adapts get stacks: a quantized model wraps every linear (LM head too),
        # and zero stacks there would cost memory and matmuls per expert for nothing.
        targeted = {path for w in live for path in w.modules}
        self.groups = []
        self.clear()
        for fused in self._fused_copies():
            fused.attach(None)  # the A rows riding on low-bit copies are restacked below
        for path, layer in self.layers.items():
            if path not in targeted:
                InputGroup([layer], self.state).set_stack(None)  # releases A rows a W_aug may still hold
                layer.group = None
                layer.set_stack(None, None)
        for paths in self._make_groups([p for p in self.layers if p in targeted]):
            self.groups.append(self._stack_group(paths))

    def _stack_group(self, paths: list[str]) -> InputGroup:
        """Stack every slot's A (under the leader's weight) and B^T ([S, r, out]) for one input group."""
        members = [self.layers[p] for p in paths]
        group = InputGroup(members, self.state)
        ref = members[0].base.weight
        num_slots = len(self.slots)
        # Zero-padded to the largest rank: zero rows/columns add nothing to the output.
        lora_a = torch.zeros(len(members), num_slots, self.rank, members[0].in_features, dtype=ref.dtype,
                             device=ref.device)
        stacks_bt = []
        for index, (path, layer) in enumerate(zip(paths, members, strict=True)):
            lora_bt = torch.zeros(num_slots, self.rank, layer.out_features, dtype=ref.dtype, device=ref.device)
            for slot, weights in enumerate(self.slots):
                if weights is None or path not in weights.modules:
                    continue
                a, b = weights.modules[path]
                lora_a[index, slot, : a.shape[0]] = a.to(ref.device, ref.dtype)
                lora_bt[slot, : b.shape[1]] = b.t().to(ref.device, ref.dtype)
            stacks_bt.append(lora_bt)
        group.set_stack(lora_a)  # copies A under the leader's weight; members get views of it
        for index, layer in enumerate(members):
            layer.group = group
            layer.set_stack(group.lora_a[index], stacks_bt[index])
        fused = members[0].quant.fused if isinstance(members[0].quant, SiblingSlice) else None
        slices = [(layer.quant.fused, layer.quant.index) for layer in members if isinstance(layer.quant, SiblingSlice)]
        if fused is not None and slices == [(fused, i) for i in range(len(fused.sizes))]:  # exactly its members
            group.riding = fused if fused.attach(group.lora_a.reshape(-1, group.lora_a.shape[-1])) else None
        return group

    def adapter_bytes(self) -> int:
        """The adapters' fp32 stacks plus their A rows riding on low-bit copies."""
        stacks = sum(
            (layer.lora_a.numel() + layer.lora_bt.numel()) * layer.lora_a.element_size()
            for layer in self.layers.values()
            if layer.lora_a is not None
        )
        return stacks + sum(group.riding.riding_bytes for group in self.groups if group.riding is not None)

    def compact_cache_bytes(self) -> int:
        """Bytes of the gathered stacks of the slots a batch uses (many-slot case only; bounded by
        COMPACT_MAX_COLUMNS columns per layer, whatever the number of experts)."""
        tensors = [g.compact_a for g in self.groups] + [layer.compact_bt for layer in self.layers.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ---- routing -----------------------------------------------------------------------
    def kernel_for(self, mixtures: Sequence[Mixture]) -> LoraKernel:
        """The kernel a batch with these mixtures would use."""
        return self._kernel([[(self._slot_index[name], w) for name, w in m] for m in mixtures])

    def _kernel(self, slots: Sequence[SlotMixture]) -> LoraKernel:
        kernel = choose_kernel(len(self.slots), self.rank, slots, self.stacked_max_columns, self.compact_max_columns)
        if kernel is LoraKernel.STACKED and self.quant != "none":
            # No W_aug to ride on over a low-bit base: a slot the batch does not use would only add A and B bytes
            # and FLOPs to every layer (a single stream with 1 of 4 experts reads a quarter of them compact).
            used = {slot for mixture in slots for slot, _ in mixture}
            if len(used) < len(self._slot_index):
                return LoraKernel.COMPACT
        return kernel

    def set_mixtures(self, mixtures: Sequence[Mixture], low_bit_only: bool = False) -> None:
        """Route row n of the next forward passes to mixtures[n]. Unknown names raise KeyError. `low_bit_only`:
        wide passes read the low-bit copy too (GateState.low_bit_only)."""
        state = self.state
        self.clear()
        state.quantized = self.quant != "none"
        state.low_bit_only = state.quantized and low_bit_only
        if not self.slots or not any(mixtures):
            return
        index = self._slot_index
        slots = [[(index[name], weight) for name, weight in mixture] for mixture in mixtures]  # KeyError if unknown
        kernel = self._kernel(slots)
        if kernel is LoraKernel.GATHERED:
            state.set_gathered(slots, self._reference)
        else:
            columns = list(range(len(self.slots)))
            if kernel is LoraKernel.COMPACT:
                columns = list(self._compact(slots))
            state.set_dense(slots, columns, self.rank, self._reference)
        state.kernel = kernel

    def _compact(self, slots: Sequence[SlotMixture]) -> tuple[int, ...]:
        """The used slots, sorted; their stacks are gathered once and reused while the batch's expert set holds."""
        used = tuple(sorted({s for m in slots for s, _ in m}))
        if used != self._compacted:
            index = torch.tensor(used, device=self._reference.device)
            for group in self.groups:
                group.compact(index)
            for layer in self.layers.values():
                if layer.lora_bt is not None:
                    layer.compact(index)
            self._compacted = used
        return used

    def clear(self) -> None:
        self.state.reset()
        for group in self.groups:
            group.forget()

    @contextlib.contextmanager
    def routing(self, mixtures: Sequence[Mixture], low_bit_only: bool = False) -> Iterator[None]:
        self.set_mixtures(mixtures, low_bit_only)
        try:
            yield
        finally:
            self.clear()
