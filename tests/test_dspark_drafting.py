"""DSpark at inference (docs/objectives.md, dspark; docs/decoding.md): the sequential Markov loop against the training hook, speculative decoding with
DSpark drafts (lossless, whole blocks accepted), and the self-contained modeling file an export ships."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dflashtrain.data.blocks import make_blocks
from dflashtrain.families.dspark.drafting import draft_sequential
from dflashtrain.families.dspark.export import export_tensors
from dflashtrain.families.dspark.heads import DSparkHeads
from test_dspark import BLOCK, HIDDEN, MASK, RANK, VOCAB, _heads, _module


# ----------------------------------------------------------------------------------------- sequential drafting
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sequential_drafting_reproduces_the_teacher_forced_logits(temperature):
    """Fed its own drafted tokens as teacher-forced data, the training hook gives the loop's logits and confidences."""
    torch.manual_seed(4)
    heads, lm_head = _heads(), nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden, anchor = torch.randn(BLOCK, HIDDEN), 6
    draft = draft_sequential(hidden, anchor, lm_head, heads, temperature, generator=torch.Generator().manual_seed(0))
    sequence = torch.tensor([[anchor, *draft.tokens.tolist()]])  # [1, B + 1]: x_a, t_0, …, t_{B−1}
    blocks = make_blocks(sequence, torch.ones_like(sequence), torch.tensor([[0]]), torch.tensor([[True]]),
                         BLOCK, MASK, label_offset=1)
    logits, extras = _module(heads, lm_head).chunk_logits(hidden.view(1, 1, BLOCK, HIDDEN), blocks)
    torch.testing.assert_close(draft.logits, logits[0, 0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(draft.confidences, torch.sigmoid(extras["confidence_logits"][0, 0]))
    if temperature == 0:
        assert draft.tokens.tolist() == logits[0, 0].argmax(-1).tolist()
        assert draft.token_probs.tolist() == [1.0] * BLOCK
    else:
        torch.testing.assert_close(draft.probs, torch.softmax(logits[0, 0] / temperature, -1))
        assert (draft.token_probs - draft.probs.gather(-1, draft.tokens[:, None])[:, 0]).abs().max() == 0


def test_sequential_drafting_batches_blocks():
    heads, lm_head = _heads(), nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden, anchors = torch.randn(3, BLOCK, HIDDEN), torch.tensor([1, 6, 9])
    batched = draft_sequential(hidden, anchors, lm_head, heads)
    for i in range(3):
        single = draft_sequential(hidden[i], int(anchors[i]), lm_head, heads)
        assert batched.tokens[i].tolist() == single.tokens.tolist()


def bigram_heads(sequence, vocab_size=32):
    """Heads whose Markov bias (+100) forces next = the first successor of prev seen in ``sequence``."""
    heads = DSparkHeads(vocab_size, 32, vocab_size, confidence=False)
    with torch.no_grad():
        heads.markov.embed.weight.copy_(torch.eye(vocab_size))  # W1[prev] = one-hot(prev)
        heads.markov.proj.weight.zero_()
        for prev, nxt in reversed(list(zip(sequence, sequence[1:]))):
            heads.markov.proj.weight[:, prev] = 0.0
            heads.markov.proj.weight[nxt, prev] = 100.0
    return heads


@pytest.mark.parametrize("prompt_index", [0, 1, 2])
def test_speculative_decoding_with_dspark_drafts_equals_plain_greedy_decoding(prompt_index):
    """Greedy DSpark rounds verify [anchor, t_0..t_{B−1}] (B + 1 tokens) and must reproduce plain decoding; a
    Markov head that knows the plain output's bigrams makes whole blocks (4 drafts) accepted."""
    from dflashtrain.inference.decode import Sampler, generate
    from dflashtrain.families.dspark.drafting import DSparkProposer
    from test_decode import PROMPTS, plain, tiny_drafter, tiny_target

    target, prompt = tiny_target(vocab_size=32, init=0.2), PROMPTS[prompt_index]
    reference = plain(target, prompt, 20).tokens
    proposer = DSparkProposer(tiny_drafter(4, 31), target, bigram_heads([prompt[-1], *reference]))
    assert proposer.block_size == 5
    speculative = generate(target, proposer, prompt, 20, (), Sampler())
    assert speculative.tokens == reference
    assert all(0 <= a <= 4 for a in speculative.accepted)
    if prompt_index < 2:  # prompt 2's output repeats a token with different successors: mostly rejections
        assert 4 in speculative.accepted


# ------------------------------------------------------------------------------------ exported modeling file
def test_shipped_modeling_file_loads_an_export_and_reproduces_the_drafter(tmp_path):
    """modeling_dspark.py, copied alone into a directory with config.json + model.safetensors (drafter names plus
    the head export names), gives the training forward's hidden for a block and the same sequential drafts."""
    import importlib.util
    import json
    import shutil

    from safetensors.torch import save_file

    from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
    from dflashtrain.families.dspark.export import MODELING_FILE, export_config
    from dflashtrain.models.masks import AnchorAttentionMask

    imports = [line for line in MODELING_FILE.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert imports and not any("dflashtrain" in line for line in imports)
    g = DrafterGeometry(hidden_size=HIDDEN, intermediate_size=16, num_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=10000.0,
                        target_layer_ids=[0, 1], block_size=BLOCK, mask_token_id=MASK)
    torch.manual_seed(6)
    drafter, heads = DFlashDrafter(g).eval(), _heads()
    drafter.reset_parameters(std=0.3)
    config = {"hidden_size": HIDDEN, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 4, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "vocab_size": VOCAB, "block_size": BLOCK,
              "dflash_config": {"target_layer_ids": [0, 1], "mask_token_id": MASK},
              **export_config({"markov_rank": RANK, "confidence_head": True})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({**drafter.state_dict(), **export_tensors(heads)}, str(tmp_path / "model.safetensors"))
    shutil.copy(MODELING_FILE, tmp_path / "modeling_dspark.py")
    spec = importlib.util.spec_from_file_location("exported_modeling_dspark", tmp_path / "modeling_dspark.py")
    modeling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modeling)
    model = modeling.Qwen3DSparkModel.from_pretrained(str(tmp_path))

    seq_len, anchor_pos, anchor = 10, 6, 3
    tapped, embeds = torch.randn(1, seq_len, 2 * HIDDEN), torch.randn(1, BLOCK, HIDDEN)
    mask = AnchorAttentionMask.build(torch.tensor([[anchor_pos]]), torch.tensor([[True]]), seq_len, BLOCK, False)
    with torch.no_grad():
        trained = drafter(embeds, tapped, (anchor_pos + torch.arange(BLOCK)).view(1, -1), mask)  # context t < a
    exported = model(embeds, tapped[:, :anchor_pos], start=anchor_pos)
    torch.testing.assert_close(exported, trained, rtol=1e-5, atol=1e-5)

    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    expected = draft_sequential(trained[0], anchor, lm_head, heads)
    tokens, probs, confidences = model.draft(exported[0], anchor, lm_head)
    assert tokens.tolist() == expected.tokens.tolist()
    torch.testing.assert_close(confidences, expected.confidences)


# ---------------------------------------------------------------------------------------- export and eval
class _JsonWithWrongRank:
    """json as the exporter uses it, except that what it writes has the wrong DSpark rank."""

    def __init__(self):
        import json

        self.json = json

    def dumps(self, config, **kwargs):
        config = {**config, "markov_rank": 4}
        return self.json.dumps(config, **kwargs)

    def __getattr__(self, name):
        return getattr(self.json, name)

def _dspark_checkpoint(path, target_dir):
    """A training-shaped DSpark checkpoint for the random target: drafter.* and heads.* + the metadata."""
    from dataclasses import asdict

    from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
    from dflashtrain.models.target import load_target_config, load_tokenizer

    config = load_target_config(str(target_dir))
    geometry = DrafterGeometry(hidden_size=64, intermediate_size=96, num_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                               target_layer_ids=[0, 2], block_size=4,
                               mask_token_id=load_tokenizer(str(target_dir)).mask_token_id)
    torch.manual_seed(7)
    drafter, heads = DFlashDrafter(geometry), DSparkHeads(config.vocab_size, 64, 8, confidence=True)
    nn.init.normal_(heads.markov.proj.weight, std=1.0)
    state = {**{f"drafter.{k}": v for k, v in drafter.state_dict().items()},
             **{f"heads.{k}": v for k, v in heads.state_dict().items()}}
    meta = {"geometry": asdict(geometry), "num_target_layers": 4, "target_path": str(target_dir), "label_offset": 1,
            "family": "dspark", "head_options": {"markov_rank": 8, "confidence_head": True},
            "vocab_size": config.vocab_size, "objective": "dspark", "config": {}}
    torch.save({"state_dict": state, "dflashtrain": meta, "global_step": 3}, path)
    return path, heads


def test_dspark_export_ships_heads_config_and_loader_and_decodes_like_the_checkpoint(random_target_dir, tmp_path,
                                                                                     monkeypatch):
    import json
    from types import SimpleNamespace

    from dflashtrain.export import hf as export_module
    from dflashtrain.inference.decode import Sampler, generate
    from dflashtrain.families.dspark.drafting import DSparkProposer
    from dflashtrain.inference.evaluate import load_drafter
    from dflashtrain.models.target import FrozenTarget
    from test_decode import plain

    checkpoint, heads = _dspark_checkpoint(tmp_path / "dspark.ckpt", random_target_dir)
    out = export_module.export(checkpoint, tmp_path / "export", None, "float32", overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dflashtrain_export.json", "model.safetensors",
                                                        "modeling_dspark.py"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"]  # what vLLM's and SGLang's Qwen3 DSpark loaders serve
    assert (config["markov_rank"], config["enable_confidence_head"], config["confidence_head_with_markov"]) == \
        (8, True, True)
    assert "dspark_config" not in config

    target = FrozenTarget.load(str(random_target_dir), "float32", [0, 2])
    prompt = [5, 17, 9, 30, 2]
    reference = plain(target, prompt, 16).tokens
    decoded = []
    for source in ({"drafter_dir": str(out), "ckpt_path": None}, {"drafter_dir": None, "ckpt_path": str(checkpoint)}):
        loaded, _, _ = load_drafter(SimpleNamespace(**source))
        proposer = loaded.family.proposer(loaded.drafter, loaded.heads, target)
        assert isinstance(proposer, DSparkProposer) and proposer.block_size == 5
        torch.testing.assert_close(proposer.heads.markov.proj.weight, heads.markov.proj.weight, rtol=0, atol=0)
        decoded.append(generate(target, proposer, prompt, 16, (), Sampler()).tokens)
    assert decoded == [reference, reference]  # greedy speculative decoding is lossless either way

    monkeypatch.setattr(export_module, "json", _JsonWithWrongRank())  # config.json written with a wrong rank
    with pytest.raises(export_module.ExportCheckError, match="markov_rank"):
        export_module.export(checkpoint, tmp_path / "wrong", None, "float32", overwrite=False)
    assert not (tmp_path / "wrong").exists()
