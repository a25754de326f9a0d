"""pk.perplexity against a hand computation over non-overlapping windows."""

import math

import pytest
import torch
from torch import nn

import prunekit as pk


class Bigram(nn.Module):
    """Logits for the next token from the current token only (a table)."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def test_perplexity_by_hand():
    table = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    ids = torch.tensor([0, 0, 1, 2, 2, 1, 0])  # window 3: [0 0 1] [2 2 1], the last token is dropped
    log_p = torch.log_softmax(table, dim=1)
    nll = -(log_p[0, 0] + log_p[0, 1]) - (log_p[2, 2] + log_p[2, 1])
    expected = math.exp(float(nll) / 4)
    model = Bigram(table)
    model.train()
    assert pk.perplexity(model, ids, window=3) == pytest.approx(expected, rel=1e-6)
    assert pk.perplexity(model, ids.unsqueeze(0), window=3, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert model.training  # its mode is restored


def test_perplexity_of_a_hugging_face_model_matches_its_own_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    ).eval()
    ids = torch.randint(0, 50, (38,))  # 4 windows of 8, 6 tokens dropped
    windows = ids[:32].view(4, 8)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert pk.perplexity(model, ids, window=8) == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)


def test_perplexity_refuses_bad_input():
    model = Bigram(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="fewer than one window"):
        pk.perplexity(model, torch.tensor([0, 1]), window=4)
    with pytest.raises(TypeError, match="integer tensor"):
        pk.perplexity(model, torch.zeros(8), window=4)
    with pytest.raises(ValueError, match="window"):
        pk.perplexity(model, torch.zeros(8, dtype=torch.long), window=1)
