"""Model loading, the generic decoder walk, BoolQ data splits and perplexity."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import TINY_FAMILIES, make_tiny_ids, make_tiny_model
from torch import nn

from rocketkit import data
from rocketkit.calibrate import stream_blocks
from rocketkit.evaluate import perplexity
from rocketkit.models import block_linears, decoder_blocks, find_decoder_blocks, load_model

LINEAR_NAMES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_walk_finds_blocks_and_linears(family):
    model = make_tiny_model(family)
    path, blocks = find_decoder_blocks(model)
    assert path == "model.layers" and blocks is model.model.layers and decoder_blocks(model) is blocks
    assert len(blocks) == 2
    for block in blocks:
        linears = block_linears(block)
        assert list(linears) == LINEAR_NAMES
        assert all(type(m) is nn.Linear for m in linears.values())


def test_conv1d_model_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"no nn.Linear layer to compress in GPT2Block; not handled: attn\.c_attn\.weight \(2-D parameter of Conv1D"):
        next(stream_blocks(model, torch.zeros(1, 4, dtype=torch.long), progress=False))


def test_conv1d_model_folder_refused_before_loading(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, vocab_size=64, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"GPT2Block; not handled: attn\.c_attn\.weight"):
        load_model(str(tmp_path))


def test_bad_spec(tmp_path):
    with pytest.raises(ValueError, match="not a local model folder"):
        load_model("someone/some-model-on-the-hub")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def test_no_linear_layers():
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        block_linears(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))

    class NoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.LayerNorm(4)) for _ in range(3)])

    with pytest.raises(ValueError, match="no nn.Linear layer"):
        next(stream_blocks(NoLinears(), torch.zeros(1, 4, dtype=torch.long), progress=False))
    with pytest.raises(ValueError, match="no decoder blocks"):
        decoder_blocks(nn.Sequential(nn.Linear(3, 3)))


def test_perplexity_matches_hf_loss():
    model = make_tiny_model("qwen2")
    ids = make_tiny_ids(n_seq=5, seq_len=29, seed=7)
    ppl = perplexity(model, ids, batch_size=2, progress=False)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert math.isclose(ppl, math.exp(float(loss)), rel_tol=1e-5)
    assert 0.5 * 256 < ppl < 2 * 256  # random weights: about uniform over the vocabulary


class ByteTokenizer:
    """UTF-8 bytes + 1, EOS = 0: decodable, so tests can see which passages a row came from."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[b + 1 for b in t.encode()] for t in texts]}

    @staticmethod
    def pieces(row):
        return bytes(int(t) - 1 if t else 0 for t in row).split(b"\0")


def test_passage_split_disjoint():
    passages = data.boolq_passages()
    assert len(passages) == len(set(passages)) > 2500
    calib, heldout = data.split_passages()
    assert not set(calib) & set(heldout)
    assert calib + heldout == passages and abs(len(calib) - len(heldout)) <= 1


def test_ids_come_from_their_half():
    tok = ByteTokenizer()
    calib, heldout = (set(p.encode() for p in half) for half in data.split_passages())
    for ids, own, other in (
        (data.calibration_ids(tok, 3 * 4096, seq_len=4096, seed=0), calib, heldout),
        (data.heldout_ids(tok, 3 * 4096, seq_len=4096), heldout, calib),
    ):
        assert ids.shape == (3, 4096) and ids.dtype == torch.long
        inner = [p for row in ids for p in ByteTokenizer.pieces(row)[1:-1]]  # whole passages only
        assert len(inner) >= 6
        assert all(p in own and p not in other for p in inner)


def test_calibration_ids_seeded():
    tok = ByteTokenizer()
    a = data.calibration_ids(tok, 1000, seq_len=100, seed=0)
    assert a.shape == (10, 100)
    assert torch.equal(a, data.calibration_ids(tok, 1000, seq_len=100, seed=0))
    assert not torch.equal(a, data.calibration_ids(tok, 1000, seq_len=100, seed=1))
    assert data.calibration_ids(tok, 1001, seq_len=100).shape == (11, 100)
    with pytest.raises(ValueError, match="only"):
        data.heldout_ids(tok, 10**9, seq_len=512)


@pytest.mark.slow
def test_smollm2_loads_and_evaluates(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert model.config.hidden_size == 576 and model.config.intermediate_size == 1536
    blocks = decoder_blocks(model)
    assert len(blocks) == 30
    assert list(block_linears(blocks[0])) == LINEAR_NAMES
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in model.config.to_dict()
    ids = data.heldout_ids(tok, 4 * 128, seq_len=128)
    assert int(ids.max()) < model.config.vocab_size
    t = time.perf_counter()
    ppl = perplexity(model, ids, batch_size=4, progress=False)
    print(f"SmolLM2-135M held-out BoolQ perplexity (4 x 128 tokens): {ppl:.3f} in {time.perf_counter() - t:.2f} s")
    assert math.isfinite(ppl) and 2.0 < ppl < 60.0
