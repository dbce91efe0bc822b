"""Token embedding and the LM head (float32 logits); tied embeddings share one Parameter."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import dense_linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.tied = False

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return dense_linear(hidden, self.weight).float()
