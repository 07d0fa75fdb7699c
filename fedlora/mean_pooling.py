"""A classifier on the mean of the last hidden states (masked), for sentence encoders.

Sentence-embedding models such as all-MiniLM-L6-v2 were trained to be read by a
masked mean over the tokens (their `1_Pooling/config.json`), not by the [CLS]
token and `pooler.dense` that `AutoModelForSequenceClassification` uses, which were
never trained for it. `model.pooling = "mean"` puts a linear head on that mean.

The module is the backbone (`AutoModel`) plus `classifier` (nn.Linear), so PEFT
keeps `classifier` as a module to save and the adapter holds LoRA + head as usual.
`fedlora export --merge` writes the backbone as a standard Hugging Face folder and
the head beside it (see docs/deployment.md, "Loading an exported model").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of each sequence's hidden states over its real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MeanPoolingClassifier(nn.Module):
    """backbone -> masked mean of the last hidden states -> linear classifier."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # PEFT and fedlora read model_type and sizes from here
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                **_: object) -> SequenceClassifierOutput:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return SequenceClassifierOutput(logits=self.classifier(masked_mean(hidden, attention_mask).float()))


HEAD_FILE = "classifier.safetensors"
POOLING_FILE = "pooling.json"


def save_exported(model: MeanPoolingClassifier, out: Path) -> None:
    """The merged model as a standard `AutoModel` folder plus the head beside it."""
    model.backbone.save_pretrained(str(out))
    save_file({k: v.detach().float().contiguous() for k, v in model.classifier.state_dict().items()}, str(out / HEAD_FILE))
    (out / POOLING_FILE).write_text(json.dumps({"pooling": "mean", "head": HEAD_FILE}, indent=2) + "\n")


def load_exported(folder: str | Path) -> MeanPoolingClassifier:
    """A classifier saved by `fedlora export --merge` with mean pooling; its
    `config.id2label` names the classes."""
    from transformers import AutoModel

    folder = Path(folder)
    head = load_file(str(folder / HEAD_FILE))
    model = MeanPoolingClassifier(AutoModel.from_pretrained(str(folder)), num_labels=head["weight"].shape[0])
    model.classifier.load_state_dict(head)
    return model.eval()
