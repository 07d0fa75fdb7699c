"""Frozen lower layers, computed once per example: the hidden states that enter the
first layer with LoRA.

When LoRA sits only on the top layers of an encoder (`lora.top_layers`, or
`lora.target_modules` naming upper layers) and the head reads the masked mean
(fedlora/mean_pooling.py), every example's hidden states below the first LoRA layer
depend on the frozen base alone: not on the adapter, the round or the strategy. A
site computes them the first time it meets an example, keeps them in this process
for as long as its base model lives, and runs only the upper layers in every later
training step and evaluation. The logits are the full model's to float rounding
(tests/test_frozen_prefix.py); per-example gradients only ever pass through the upper
layers, so DP-SGD and its per-example invariant are unchanged.

The lower layers run without dropout (in eval mode): a kept value must not carry one
draw's dropout mask into every later step. The upper layers keep the mode the caller
set.

When the first LoRA layer's only adapted module is its feed-forward output projection
(`lora.target_modules = "mlp_out"`), the kept point moves further up, into that layer:
its attention and the feed-forward's first half are frozen too, so a site keeps, per
token, the projection's input (the intermediate activations), the frozen projection's
output and the attention output it is added to. A training step then runs only LoRA's
two small factors, the residual LayerNorm and the head, instead of a whole
transformer layer.

Supported: BERT and RoBERTa encoders (`embeddings` + `encoder.layer`) under a
mean-pooling head, the default model among them. Anything else gets `None` from `frozen_prefix`
and trains through the full model, as before.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from fedlora.mean_pooling import MeanPoolingClassifier, masked_mean
from fedlora.text_data import Example, collate

# Encoders whose layers take (hidden states, attention mask) and nothing else: positions
# enter once, in the embeddings. (A rotary encoder needs positions in every layer.)
SUPPORTED = ("bert", "roberta")

# Kept states per base model, at most this many bytes; beyond it, examples are computed
# per use (the same result, the full cost). Kept inside a layer ("mlp_out") a token holds
# intermediate + 2 x hidden values (2,304 floats on the default): about 2.9 GB for the
# default simulation's 6,000 notes, all in one process.
MAX_CACHE_BYTES = 4 << 30

_stores: "weakref.WeakKeyDictionary[nn.Module, PrefixStore]" = weakref.WeakKeyDictionary()


@dataclass
class PrefixStore:
    """Per base model: (first LoRA layer, kept point, token ids) -> kept states [tokens, values]."""

    states: dict[tuple[int, str, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    computed: int = 0  # examples whose lower layers ran (a count for tests and benchmarks)


@dataclass
class FrozenPrefix:
    classifier: MeanPoolingClassifier
    first: int  # index of the first encoder layer with LoRA; layers below it are skipped
    store: PrefixStore
    # "layer": kept are the hidden states entering layer `first`. "mlp_out": LoRA in layer
    # `first` sits on its feed-forward output projection alone, and kept are that
    # projection's input, its frozen output and the attention output (concatenated).
    point: str = "layer"

    def logits(self, input_ids: list[list[int]], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The classifier's logits for a collated batch of these examples (right-padded, as
        fedlora.text_data.collate pads), running only what lies above the kept point."""
        attention_mask = batch["attention_mask"]
        kept = self._lower_states(input_ids, attention_mask.shape[1], attention_mask.device)
        backbone = self.classifier.backbone
        layers = backbone.encoder.layer
        if self.point == "mlp_out":
            hidden = _mlp_output(layers[self.first].output, kept)
            above = layers[self.first + 1:]
        else:
            hidden, above = kept, layers[self.first:]
        if len(above):
            mask = _bidirectional_mask(backbone, hidden, attention_mask)
            for layer in above:
                hidden = layer(hidden, mask)
        return self.classifier.classifier(masked_mean(hidden, attention_mask).float())

    def _lower_states(self, input_ids: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
        keys = [(self.first, self.point, tuple(ids)) for ids in input_ids]
        missing = [i for i, key in enumerate(keys) if key not in self.store.states]
        fresh = dict(zip(missing, self._compute([input_ids[i] for i in missing], device))) if missing else {}
        states = []
        for i, key in enumerate(keys):
            state = fresh.get(i)
            if state is None:
                state = self.store.states[key]
            elif self.store.nbytes + state.numel() * state.element_size() <= MAX_CACHE_BYTES:
                self.store.states[key] = state
                self.store.nbytes += state.numel() * state.element_size()
            states.append(state)
        # One padded copy (zeros after each example's tokens), not a copy per example.
        out = pad_sequence(states, batch_first=True)
        if out.shape[1] < width:
            out = torch.nn.functional.pad(out, (0, 0, 0, width - out.shape[1]))
        return out

    @torch.no_grad()
    def _compute(self, input_ids: list[list[int]], device: torch.device) -> list[torch.Tensor]:
        """Embeddings and the layers below `first` (and, at "mlp_out", layer `first` up to its
        output projection), in eval mode; one unpadded tensor per example."""
        backbone = self.classifier.backbone
        lower = [backbone.embeddings, *backbone.encoder.layer[: self.first + (self.point == "mlp_out")]]
        modes = [m.training for m in lower]
        # Padded as the training loop pads; the pad id is masked out, so 0 serves.
        batch = {k: v.to(device) for k, v in collate([Example(ids, 0) for ids in input_ids], 0).items()}
        try:
            for m in lower:
                m.eval()
            hidden = backbone.embeddings(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            mask = _bidirectional_mask(backbone, hidden, batch["attention_mask"])
            for layer in backbone.encoder.layer[: self.first]:
                hidden = layer(hidden, mask)
            if self.point == "mlp_out":
                hidden = _mlp_output_inputs(backbone.encoder.layer[self.first], hidden, mask)
        finally:
            for m, mode in zip(lower, modes):
                m.train(mode)
        self.store.computed += len(input_ids)
        return [hidden[i, : len(row)].clone() for i, row in enumerate(input_ids)]


def _mlp_output_inputs(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    """What a BERT-style layer's feed-forward output block (`layer.output`: dense, dropout,
    LayerNorm over the sum with the attention output) reads, with its frozen projection
    applied: [intermediate activations | frozen dense output | attention output]."""
    attention_output = layer.attention(hidden, mask)[0]
    intermediate = layer.intermediate(attention_output)
    dense = layer.output.dense
    return torch.cat([intermediate, dense.base_layer(intermediate), attention_output], dim=-1)


def _mlp_output(block: nn.Module, kept: torch.Tensor) -> torch.Tensor:
    """The output block on kept states: the frozen projection's kept output plus LoRA's
    change, then the block's own dropout and residual LayerNorm, as BertOutput computes."""
    hidden = kept.shape[-1] - block.dense.in_features
    intermediate, dense_output, attention_output = kept.split([block.dense.in_features, hidden // 2, hidden // 2], dim=-1)
    projected = (dense_output + lora_change(block.dense, intermediate)).to(dense_output.dtype)
    return block.LayerNorm(block.dropout(projected) + attention_output)


def lora_change(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What PEFT's LoRA Linear adds to its base layer's output for `x` (its forward less
    `base_layer(x)`): each active adapter's B(A(dropout(x))) * scaling."""
    change = torch.zeros((), dtype=x.dtype, device=x.device)
    for name in module.active_adapters:
        if name in module.lora_A:
            a, b = module.lora_A[name], module.lora_B[name]
            inputs = module.lora_dropout[name](module._cast_input_dtype(x, a.weight.dtype))
            change = change + b(a(inputs)) * module.scaling[name]
    return change


def _plain_lora(module: nn.Module) -> bool:
    """A PEFT LoRA Linear whose output `lora_change` reproduces: adapters on, unmerged, vanilla."""
    return (hasattr(module, "base_layer") and hasattr(module, "lora_A") and not module.disable_adapters
            and not module.merged and not any(name in module.lora_variant for name in module.active_adapters)
            and isinstance(module.base_layer, nn.Linear))


def _bidirectional_mask(backbone: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=attention_mask)


def frozen_prefix(model: nn.Module) -> FrozenPrefix | None:
    """The prefix of `model` (a PEFT model, possibly wrapped by Opacus) that can be kept,
    or None when nothing below the first LoRA layer can be skipped."""
    classifier = next((m for m in model.modules() if isinstance(m, MeanPoolingClassifier)), None)
    if classifier is None:
        return None
    backbone = classifier.backbone
    if getattr(backbone.config, "model_type", None) not in SUPPORTED or getattr(backbone.config, "is_decoder", False):
        return None
    if any(_adapted(backbone.embeddings)):
        return None
    layers = backbone.encoder.layer
    first = next((i for i, layer in enumerate(layers) if any(_adapted(layer))), len(layers))
    point = "mlp_out" if first < len(layers) and _only_output_projection_adapted(layers[first]) else "layer"
    if first == 0 and point == "layer":
        return None
    store = _stores.get(backbone)
    if store is None:
        store = _stores[backbone] = PrefixStore()
    return FrozenPrefix(classifier, first, store, point)


def _only_output_projection_adapted(layer: nn.Module) -> bool:
    """Whether the layer's adapted parameters all sit in its feed-forward output projection
    (`output.dense`, a plain LoRA Linear), so that everything before it is frozen."""
    output = getattr(layer, "output", None)
    dense = getattr(output, "dense", None)
    if dense is None or not _plain_lora(dense) or not hasattr(layer, "intermediate") or not hasattr(output, "LayerNorm"):
        return False
    adapted = [name for (name, _), changes in zip(layer.named_parameters(), _adapted(layer)) if changes]
    return all(name.startswith("output.dense.") for name in adapted)


def _adapted(module: nn.Module):
    """Whether each parameter can change what the module computes: trainable, or LoRA
    (a frozen LoRA factor still changes from round to round)."""
    return (p.requires_grad or "lora_" in name for name, p in module.named_parameters())
