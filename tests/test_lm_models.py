"""kdlab.lm.models: presets, local HF directories, LoRA export, atomic saves and vocabulary checks."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from kdlab.data.byte_tokens import BYTE_VOCAB_SIZE, byte_tokenizer
from kdlab.errors import ConfigError, DataNotFoundError, UnknownNameError
from kdlab.lm.models import (
    LM_PRESETS,
    LMModelConfig,
    LoraOptions,
    build_lm,
    check_vocabularies,
    count_parameters,
    gpt2_parameter_count,
    is_lora,
    lm_describe,
    load_tokenizer,
    merge_for_export,
    preset_config,
    save_student,
)

DOCUMENTED_PARAMS = {
    "gpt-tiny": 41_952,
    "gpt-2l": 462_720,
    "gpt-6l": 2_768_448,
    "gpt-20m": 19_572_224,
    "gpt-100m": 100_217_088,
}


def _ids(batch: int = 2, length: int = 16, vocab: int = BYTE_VOCAB_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def _word_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<pad>")


WORDS = {"<pad>": 0, "[UNK]": 1, "the": 2, "a": 3, "cat": 4, "b": 5, "z": 6}


def test_every_preset_has_its_documented_parameter_count():
    assert set(LM_PRESETS.names()) == set(DOCUMENTED_PARAMS)
    for name, expected in DOCUMENTED_PARAMS.items():
        config = preset_config(name)
        assert gpt2_parameter_count(config) == expected, name
        with torch.device("meta"):
            model = GPT2LMHeadModel(config)
        assert count_parameters(model) == expected, name
        assert config.vocab_size == BYTE_VOCAB_SIZE and config.tie_word_embeddings
        assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    teacher, student = DOCUMENTED_PARAMS["gpt-6l"], DOCUMENTED_PARAMS["gpt-2l"]
    assert 4 <= teacher / student <= 8


def test_preset_build_is_seeded_and_described():
    config = LMModelConfig(preset="gpt-tiny", config={"n_positions": 64})
    first, second = build_lm(config, seed=3), build_lm(config, seed=3)
    other = build_lm(config, seed=4)
    ids = _ids()
    assert torch.equal(_logits(first, ids), _logits(second, ids))
    assert not torch.equal(_logits(first, ids), _logits(other, ids))
    info = lm_describe(first)
    assert info["arch"] == "gpt2" and info["vocab"] == BYTE_VOCAB_SIZE and info["context"] == 64
    assert info["layers"] == 2 and info["d_model"] == 32 and info["lora_r"] == 0
    assert info["params"] == info["trainable_params"] == gpt2_parameter_count(first.config)
    assert build_lm(LMModelConfig(preset="gpt-tiny"), vocab_size=300).config.vocab_size == 300
    assert next(build_lm(LMModelConfig(preset="gpt-tiny", dtype="bfloat16")).parameters()).dtype == torch.bfloat16


def test_byte_tokenizer():
    tokenizer = load_tokenizer(LMModelConfig(preset="gpt-2l"))
    assert len(tokenizer) == BYTE_VOCAB_SIZE and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer("ab").input_ids == [ord("a") + 3, ord("b") + 3, 1]


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=BYTE_VOCAB_SIZE, n_layer=1, n_embd=16, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1
        )
    )


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_local_directory_loads_with_identical_logits(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    config = LMModelConfig(path=str(tmp_path))
    loaded = build_lm(config)
    ids = _ids()
    assert type(loaded) is type(model)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert load_tokenizer(config).get_vocab() == byte_tokenizer().get_vocab()
    assert lm_describe(loaded)["arch"] == model.config.model_type


def test_lora_trains_only_adapters_and_merges_to_the_same_logits(tmp_path):
    config = LMModelConfig(preset="gpt-tiny", lora=LoraOptions(r=4, alpha=8))
    model = build_lm(config, seed=0)
    assert is_lora(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    info = lm_describe(model)
    assert info["lora_r"] == 4 and 0 < info["trainable_params"] < info["params"]

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = _ids(length=24)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    lora_logits = _logits(model, ids)
    plain_base = build_lm(LMModelConfig(preset="gpt-tiny"), seed=0)
    assert not torch.allclose(lora_logits, _logits(plain_base, ids))  # the step changed something

    out = save_student(model, byte_tokenizer(), tmp_path / "student")
    assert is_lora(model)  # save_student merged a copy
    merged = merge_for_export(model)
    assert not is_lora(merged) and type(merged) is GPT2LMHeadModel
    torch.testing.assert_close(_logits(merged, ids), lora_logits, rtol=1e-5, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(reloaded) is GPT2LMHeadModel
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    torch.testing.assert_close(_logits(reloaded, ids), lora_logits, rtol=1e-5, atol=1e-5)


def test_lora_on_llama_uses_peft_default_targets(tmp_path):
    _tiny_llama().save_pretrained(tmp_path)
    model = build_lm(LMModelConfig(path=str(tmp_path), lora=LoraOptions(r=2)))
    targets = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad}
    assert targets == {"q_proj", "v_proj"}


def test_save_student_round_trip_is_atomic_and_replaces(tmp_path):
    model = build_lm(LMModelConfig(preset="gpt-tiny"), seed=1)
    target = tmp_path / "out" / "student"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    save_student(model, byte_tokenizer(), target)
    assert (target / "model.safetensors").is_file() and not (target / "stale.txt").exists()
    assert [p.name for p in target.parent.iterdir()] == ["student"]  # no temp or moved-aside folder left
    reloaded = AutoModelForCausalLM.from_pretrained(target, local_files_only=True)
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    assert tokenizer.get_vocab() == byte_tokenizer().get_vocab()
    assert lm_describe(build_lm(LMModelConfig(path=str(target))))["params"] == count_parameters(model)


def test_identical_vocabularies_need_no_map_and_padding_is_sliced():
    tokenizer = byte_tokenizer()
    assert check_vocabularies(tokenizer, byte_tokenizer(), 259, 259) is None
    padded = check_vocabularies(tokenizer, byte_tokenizer(), 264, 259)
    assert padded is not None and len(padded) == 259 and padded.coverage == 1.0
    teacher, student = torch.randn(2, 3, 264), torch.randn(2, 3, 259)
    projected_teacher, projected_student = padded.project(teacher, student)
    assert torch.equal(projected_teacher, teacher[..., :259]) and torch.equal(projected_student, student)
    with pytest.raises(ConfigError, match="only 200 logits"):
        check_vocabularies(tokenizer, byte_tokenizer(), 259, 200)


def test_different_vocabularies_fail_saying_how():
    words = _word_tokenizer(WORDS)
    with pytest.raises(ConfigError) as caught:
        check_vocabularies(byte_tokenizer(), words, 259, 7)
    message = str(caught.value)
    assert "\n" not in message
    assert "teacher tokenizer 259 tokens (259 logits), student 7 (7 logits)" in message
    assert "4 token strings are shared, 3 of them with different ids" in message  # <pad> keeps id 0
    assert "'a' teacher 100 student 3" in message
    assert "255 teacher tokens are not in the student's vocabulary" in message
    assert "3 student tokens are not in the teacher's (e.g. '[UNK]', 'the', 'cat')" in message
    assert "shared-tokens" in message and "JSON" in message


def test_shared_tokens_map_projects_like_with_like():
    words = _word_tokenizer(WORDS)
    vocabulary_map = check_vocabularies(byte_tokenizer(), words, 259, 7, mapping="shared-tokens")
    # by hand: '<pad>' 0 -> 0, 'a' (byte 97) 100 -> 3, 'b' 101 -> 5, 'z' (byte 122) 125 -> 6
    assert vocabulary_map.teacher_ids.tolist() == [0, 100, 101, 125]
    assert vocabulary_map.student_ids.tolist() == [0, 3, 5, 6]
    assert vocabulary_map.coverage == pytest.approx(4 / 7)
    teacher = torch.arange(259.0).expand(2, 5, 259)
    student = torch.arange(7.0).expand(2, 5, 7) * 10
    projected_teacher, projected_student = vocabulary_map.project(teacher, student)
    assert projected_teacher.shape == projected_student.shape == (2, 5, 4)
    assert projected_teacher[0, 0].tolist() == [0, 100, 101, 125]
    assert projected_student[1, 4].tolist() == [0, 30, 50, 60]
    mass = vocabulary_map.teacher_mass(torch.zeros(1, 259))
    torch.testing.assert_close(mass, torch.tensor([4 / 259]))
    # the other direction: the word-level model as teacher
    reverse = check_vocabularies(words, byte_tokenizer(), 7, 259, mapping="shared-tokens")
    assert reverse.teacher_ids.tolist() == [0, 3, 5, 6] and reverse.student_ids.tolist() == [0, 100, 101, 125]


def test_json_mapping(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"100": 3, "2": 1}))
    vocabulary_map = check_vocabularies(byte_tokenizer(), _word_tokenizer(WORDS), 259, 7, mapping=str(path))
    assert vocabulary_map.teacher_ids.tolist() == [2, 100] and vocabulary_map.student_ids.tolist() == [1, 3]
    path.write_text(json.dumps({"100": 9}))
    with pytest.raises(ConfigError, match="outside the models' vocabularies"):
        check_vocabularies(byte_tokenizer(), _word_tokenizer(WORDS), 259, 7, mapping=str(path))
    path.write_text(json.dumps({"100": 3, "101": 3}))
    with pytest.raises(ConfigError, match="several teacher tokens to student id 3"):
        check_vocabularies(byte_tokenizer(), _word_tokenizer(WORDS), 259, 7, mapping=str(path))
    with pytest.raises(DataNotFoundError, match="neither 'shared-tokens' nor an existing JSON file"):
        check_vocabularies(byte_tokenizer(), _word_tokenizer(WORDS), 259, 7, mapping="shared_tokens")


def test_bad_configs_fail_with_one_line(tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown LM preset 'gpt-6'; did you mean .*'gpt-6l'.*\(valid: "):
        build_lm(LMModelConfig(preset="gpt-6"))
    with pytest.raises(ConfigError, match=r"exactly one of model\.preset or model\.path"):
        build_lm(LMModelConfig())
    with pytest.raises(ConfigError, match="exactly one"):
        build_lm(LMModelConfig(preset="gpt-tiny", path=str(tmp_path)))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        build_lm(LMModelConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(DataNotFoundError, match=r"has no config\.json"):
        build_lm(LMModelConfig(path=str(tmp_path)))
    with pytest.raises(DataNotFoundError, match=r"has no config\.json"):
        load_tokenizer(LMModelConfig(path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"unknown model config key 'n_layers'.*did you mean 'n_layer'"):
        build_lm(LMModelConfig(preset="gpt-tiny", config={"n_layers": 3}))
    with pytest.raises(ConfigError, match="unknown model dtype 'fp32'"):
        build_lm(LMModelConfig(preset="gpt-tiny", dtype="fp32"))
    with pytest.raises(ConfigError, match="bad LoRA options"):
        build_lm(LMModelConfig(preset="gpt-tiny", lora=LoraOptions(r=-1)))
    _tiny_gpt2().save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match="259 logits but its tokenizer has 300 tokens"):
        build_lm(LMModelConfig(path=str(tmp_path / "small")), vocab_size=300)
    with pytest.raises(DataNotFoundError, match="no tokenizer"):
        load_tokenizer(LMModelConfig(path=str(tmp_path / "small")))
