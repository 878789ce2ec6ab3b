"""Text data for LM distillation on real files: the standard library's own sources, folders and
JSONL files written here, checked token by token against the raw bytes."""

from __future__ import annotations

import copy
import json
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdlab.data.byte_tokens import (
    BYTE_VOCAB_SIZE,
    EOS_ID,
    IGNORE_INDEX,
    PAD_ID,
    byte_tokenizer,
    encode_bytes,
    hash_fraction,
)
from kdlab.data.text import TextDataModule, create_text_datamodule, pairs_datamodule
from kdlab.data.text_corpus import TextCorpus
from kdlab.data.text_pairs import function_pairs, read_jsonl, tokenize_pair, write_jsonl
from kdlab.errors import ConfigError, DataNotFoundError

SMALL_CAPS = {"max_train_bytes": 40_000, "max_val_bytes": 12_000}
PAIRS = [
    ("def add(a, b):\n", "    return a + b\n"),
    ("Say hé", "wörld 🙂"),
    ("", "no prompt"),
    ("a longer prompt that goes on", "x"),
    ("q", ""),
]


def byte_ids(text: str | bytes) -> list[int]:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return [b + 3 for b in data]


@pytest.fixture(scope="module")
def stdlib_corpus() -> TextCorpus:
    return TextCorpus.stdlib()


def on_rank(datamodule: TextDataModule, rank: int, world: int) -> TextDataModule:
    """What a trainer on ``world`` processes shows the module (only its rank and world are read)."""
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # type: ignore[assignment]
    return datamodule


# --- tokenizer -----------------------------------------------------------------------------------


def test_encode_bytes_is_the_byte_tokenizer() -> None:
    tokenizer = byte_tokenizer()
    text = "héllo wörld — 日本語 🙂\n\ttabs\x00nul"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encode_bytes(text.encode("utf-8")).tolist() == ids == byte_ids(text)
    assert encode_bytes(text.encode("utf-8")).dtype == torch.long
    assert tokenizer(text)["input_ids"] == [*ids, EOS_ID]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (PAD_ID, EOS_ID, 2)
    assert len(tokenizer) == BYTE_VOCAB_SIZE
    assert tokenizer.decode(ids) == text


# --- byte corpus ---------------------------------------------------------------------------------


def test_stdlib_split_is_by_file_deterministic_and_about_val_fraction(stdlib_corpus: TextCorpus) -> None:
    again = TextCorpus.stdlib()
    assert again.split_files == stdlib_corpus.split_files
    train, validation = (set(stdlib_corpus.split_files[s]) for s in ("train", "validation"))
    assert not train & validation and train | validation == set(stdlib_corpus.files)
    assert len(stdlib_corpus.files) > 300
    assert 0.02 < len(validation) / len(stdlib_corpus.files) < 0.10
    # the split depends on each relative path alone
    assert validation == {name for name in stdlib_corpus.files if hash_fraction(name) < 0.05}
    assert not any(
        part in ("site-packages", "test", "tests", "idlelib") for name in train | validation for part in name.split("/")
    )
    assert all(name.endswith(".py") for name in stdlib_corpus.files)


def expected_stream(corpus: TextCorpus, split: str, cap: int) -> list[int]:
    """The split's tokens from the raw files: bytes + 3, eos between files, cut at the cap."""
    stream: list[int] = []
    for name in corpus.split_files[split]:
        if stream:
            stream.append(EOS_ID)
        stream.extend(byte_ids((corpus.root / name).read_bytes()))
        if len(stream) >= cap:
            break
    return stream[:cap]


def test_blocks_are_the_raw_bytes_shifted_by_one_within_the_caps() -> None:
    block = 64
    datamodule = create_text_datamodule("stdlib", block_size=block, **SMALL_CAPS)
    datamodule.setup()
    corpus_info = datamodule.describe()["corpus"]
    for split, dataset, cap in (
        ("train", datamodule.train_set, SMALL_CAPS["max_train_bytes"]),
        ("validation", datamodule.val_set, SMALL_CAPS["max_val_bytes"]),
    ):
        corpus = TextCorpus.stdlib(**SMALL_CAPS)
        stream = expected_stream(corpus, split, cap)
        assert len(stream) == cap == corpus_info[split]["tokens"]  # the stdlib has more than the caps
        assert corpus_info[split]["bytes"] + corpus_info[split]["files"] - 1 == cap
        assert len(dataset) == cap // (block + 1)
        for i in (0, 1, len(dataset) - 1):
            sample = dataset[i]
            start = i * (block + 1)
            assert sample["input_ids"].tolist() == stream[start : start + block]
            assert sample["labels"].tolist() == stream[start + 1 : start + block + 1]
            assert sample["attention_mask"].tolist() == [1] * block and sample["index"] == i
    assert EOS_ID in datamodule.train_set.blocks  # file separators are there


def test_stdlib_describe_records_the_provenance() -> None:
    datamodule = create_text_datamodule("stdlib", block_size=32, **SMALL_CAPS)
    info = datamodule.describe()
    corpus = info["corpus"]
    assert corpus["root"] == sysconfig.get_paths()["stdlib"] and corpus["kind"] == "stdlib"
    assert corpus["python_version"].count(".") == 2 and corpus["files_found"] > 300
    assert corpus["train"]["files"] >= 1 and corpus["validation"]["bytes"] > 0
    assert info["vocab_size"] == BYTE_VOCAB_SIZE and info["pad_token_id"] == PAD_ID
    assert info["train_samples"] == datamodule.num_train_samples == 40_000 // 33
    assert info["val_tokens"] == datamodule.num_val_tokens == (12_000 // 33) * 32
    json.dumps(info)  # a run can record it


def write_folder(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"first file\n",
        "sub/b.md": "# ünïcode heading\n".encode(),
        "sub/deeper/c.py": b"print('hi')\n",
        "d.txt": b"plain\n" * 50,
        "e.rst": b"Title\n=====\n",
        "skip.bin": b"\x00\x01binary",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_a_folder_of_text_files(tmp_path: Path) -> None:
    files = write_folder(tmp_path)
    corpus = TextCorpus(tmp_path, val_fraction=0.3)
    assert corpus.files == sorted(name for name in files if not name.endswith(".bin"))
    assert set(corpus.split_files["train"]) | set(corpus.split_files["validation"]) == set(corpus.files)
    assert corpus.split_files["validation"]  # at least one file held out
    only_txt = TextCorpus(tmp_path, "*.txt")
    assert only_txt.files == ["a.txt", "d.txt"]
    datamodule = create_text_datamodule("folder", path=tmp_path, block_size=8, patterns=["**/*.txt", "**/*.md"])
    datamodule.setup()
    info = datamodule.describe()["corpus"]
    total = sum(info[s]["bytes"] for s in ("train", "validation"))
    assert total == sum(len(files[n]) for n in ("a.txt", "d.txt", "sub/b.md"))
    stream = expected_stream(datamodule.build.args[0], "train", 10**9)  # type: ignore[attr-defined]
    assert datamodule.train_set.blocks[0].tolist() == stream[:9]


def test_missing_or_empty_folder_names_the_path_and_pattern(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match=f"{missing}.*does not exist.*\\*\\*/\\*\\.txt"):
        create_text_datamodule("folder", path=missing)
    (tmp_path / "only.bin").write_bytes(b"x")
    with pytest.raises(DataNotFoundError, match=f"{tmp_path} has 0 files matching \\*\\*/\\*\\.txt"):
        create_text_datamodule("folder", path=tmp_path, patterns="**/*.txt")


def test_unknown_source_and_option_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown text source 'stdlb'; did you mean 'stdlib'.*valid: stdlib, folder"):
        create_text_datamodule("stdlb")
    with pytest.raises(ConfigError, match="has no option max_bytes \\(valid: val_fraction, max_train_bytes"):
        create_text_datamodule("stdlib", max_bytes=10)
    with pytest.raises(ConfigError, match="'jsonl' needs a path"):
        create_text_datamodule("jsonl")


# --- prompt/response pairs -----------------------------------------------------------------------


@pytest.fixture
def jsonl_module(tmp_path: Path) -> TextDataModule:
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "val.jsonl", PAIRS[:2])
    return create_text_datamodule(
        "jsonl", path=tmp_path / "train.jsonl", val_path=tmp_path / "val.jsonl", block_size=64, eval_batch_size=8
    )


def test_jsonl_batches_mask_prompt_and_padding_token_by_token(jsonl_module: TextDataModule) -> None:
    batch = next(iter(jsonl_module.ordered_train_dataloader()))
    assert batch["index"].tolist() == list(range(len(PAIRS)))
    width = max(len(byte_ids(p)) + len(byte_ids(r)) for p, r in PAIRS)  # sequence + eos, minus the last
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (len(PAIRS), width)
    prompt_width = max(len(byte_ids(p)) for p, _ in PAIRS)
    assert batch["prompt_ids"].shape == batch["prompt_attention_mask"].shape == (len(PAIRS), prompt_width)
    for row, (prompt, response) in enumerate(PAIRS):
        p, r = byte_ids(prompt), byte_ids(response)
        sequence = p + r + [EOS_ID]
        n = len(sequence) - 1
        pad = width - n
        assert batch["input_ids"][row].tolist() == sequence[:-1] + [PAD_ID] * pad
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * pad
        no_loss = max(len(p) - 1, 0)  # positions whose target is a prompt token
        # targets: the response then eos (an empty prompt has nothing to predict its first token from)
        targets = [*r, EOS_ID] if p else [*r[1:], EOS_ID]
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * no_loss + targets + [IGNORE_INDEX] * pad
        left = prompt_width - len(p)
        assert batch["prompt_ids"][row].tolist() == [PAD_ID] * left + p
        assert batch["prompt_attention_mask"][row].tolist() == [0] * left + [1] * len(p)
    for key, value in batch.items():
        assert value.dtype == torch.long, key
    assert jsonl_module.train_prompts() == [p for p, _ in PAIRS]
    same = pairs_datamodule(PAIRS, PAIRS, block_size=64)
    assert same.num_val_tokens == int((batch["labels"] != IGNORE_INDEX).sum())


def test_truncation_keeps_the_prompt_end_and_cuts_the_response() -> None:
    tokenizer = byte_tokenizer()
    prompt, response = "0123456789abcdef", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    example = tokenize_pair(prompt, response, tokenizer, max_length=16, max_prompt_length=6)
    assert example.prompt.tolist() == byte_ids("abcdef")
    assert example.sequence.tolist() == byte_ids("abcdef" + "ABCDEFGHIJK")  # 17 tokens, eos cut off
    short = tokenize_pair(prompt, "AB", tokenizer, max_length=16, max_prompt_length=6)
    assert short.sequence.tolist() == byte_ids("23456789abcdef") + byte_ids("AB") + [EOS_ID]
    assert short.labels.tolist() == [IGNORE_INDEX] * 13 + byte_ids("AB") + [EOS_ID]


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:3: missing key 'response'"):
        create_text_datamodule("jsonl", path=path)
    path.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: 'response' is a int"):
        read_jsonl(path)
    with pytest.raises(DataNotFoundError, match=r"missing\.jsonl does not exist"):
        create_text_datamodule("jsonl", path=tmp_path / "missing.jsonl")


def test_written_pairs_read_back_and_replace_the_training_split(tmp_path: Path, jsonl_module: TextDataModule) -> None:
    generated = [("p1\n", 'line "quoted"\nnext'), ("p2 é", "🙂\\n")]
    path = write_jsonl(tmp_path / "gen" / "teacher.jsonl", generated)
    assert read_jsonl(path) == generated
    assert not [f for f in path.parent.iterdir() if f.name != "teacher.jsonl"]  # no temporary left
    swapped = jsonl_module.with_train_pairs(read_jsonl(path))
    assert swapped.num_train_samples == 2 and swapped.val_set is jsonl_module.val_set
    assert jsonl_module.num_train_samples == len(PAIRS)  # the original is untouched
    batch = next(iter(swapped.ordered_train_dataloader()))
    assert batch["input_ids"][0, : len(byte_ids("p1\n"))].tolist() == byte_ids("p1\n")
    rows = {
        "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        "labels": torch.tensor([[-100, 7, 1], [9, 1, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "index": torch.tensor([0, 1]),
    }
    generated_module = copy.copy(jsonl_module)
    generated_module.use_generated_training_set(rows)
    assert generated_module.num_train_samples == 2 and jsonl_module.num_train_samples == len(PAIRS)
    loaded = next(iter(generated_module.train_dataloader()))
    order = loaded["index"].argsort()
    assert torch.equal(loaded["labels"][order], rows["labels"]) and loaded["index"][order].tolist() == [0, 1]
    made = pairs_datamodule(generated * 20 + [(f"prompt {i}", "r") for i in range(40)], batch_size=4)
    assert made.num_train_samples + made.num_val_samples == 80 and made.num_val_samples >= 1
    made.setup()
    assert [p for p, _ in made.train_set.pairs].count("p1\n") in (0, 20)  # one prompt lands on one side


def test_jsonl_with_another_tokenizer(tmp_path: Path) -> None:
    """A caller's own Hugging Face tokenizer (here a word-level one built in memory)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in ["the", "cat", "sat", "on", "a", "mat", "é", "dog"]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    pairs = [("the cat", "sat on a mat"), ("a dog", "sat é")]
    datamodule = pairs_datamodule(pairs, pairs[:1], tokenizer=tokenizer, block_size=16)
    batch = next(iter(datamodule.ordered_train_dataloader()))
    the, cat, sat, on, a, mat = (vocab[w] for w in ["the", "cat", "sat", "on", "a", "mat"])
    assert batch["input_ids"][0].tolist() == [the, cat, sat, on, a, mat]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, sat, on, a, mat, 1]
    assert datamodule.vocab_size == len(vocab)
    # "sat on a mat" is 12 bytes over 5 targets (4 words and the eos)
    assert datamodule.val_bytes_per_token == pytest.approx(12 / 5)


def test_function_pairs_from_source() -> None:
    source = (
        "import os\n\n"
        "class A:\n"
        "    def method(self, x,\n"
        "               y):  # two lines\n"
        '        """Add them.\n\n        Really."""\n'
        "        total = x + y\n\n"
        "        return total\n\n"
        "    def bare(self):\n"
        "        return 1\n\n"
        "    def short(self): return 2\n\n"
        "async def fetch():\n"
        "    '''Fetch.'''\n"
        "    await thing()\n"
        "x = 1\n"
    )
    assert function_pairs(source, response_bytes=20) == [
        (
            'def method(self, x,\n           y):  # two lines\n    """Add them.\n\n    Really."""\n',
            "    total = x + y\n\n ",
        ),
        ("async def fetch():\n    '''Fetch.'''\n", "    await thing()\n"),
    ]


def test_stdlib_functions_source_gives_real_pairs() -> None:
    datamodule = create_text_datamodule("stdlib-functions", block_size=128, response_bytes=64, **SMALL_CAPS)
    datamodule.setup()
    assert datamodule.num_train_samples > 10 and datamodule.num_val_samples > 0
    for prompt, response in datamodule.train_set.pairs[:50]:
        assert prompt.lstrip().startswith(("def ", "async def ")) and ('"""' in prompt or "'''" in prompt)
        assert response.strip() and len(response.encode()) <= 64
    again = create_text_datamodule("stdlib-functions", block_size=128, response_bytes=64, **SMALL_CAPS)
    again.setup()
    assert again.train_set.pairs == datamodule.train_set.pairs
    assert datamodule.describe()["corpus"]["train"]["pairs"] == datamodule.num_train_samples


# --- loaders -------------------------------------------------------------------------------------


def batches(datamodule: TextDataModule, epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return list(loader)


@pytest.mark.parametrize("source", ["stdlib", "stdlib-functions"])
def test_two_ranks_batches_together_are_the_one_process_batch(source: str) -> None:
    """Global batch 8 on 2 ranks: rank r's row i is row 2i + r of the one-process batch."""
    options = {"block_size": 32, "batch_size": 8, "seed": 3, **SMALL_CAPS}
    single = batches(create_text_datamodule(source, **options), epoch=2)
    ranks = [batches(on_rank(create_text_datamodule(source, **options), r, 2), epoch=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for k, whole in enumerate(single[:-1]):  # the last batch is ragged (and padded on the ranks)
        assert [len(rank[k]["index"]) for rank in ranks] == [4, 4]
        for r in range(2):
            for key, value in ranks[r][k].items():
                rows = whole[key][r::2]
                if value.dim() == 2:  # pairs pad to the longest sample of each rank's own batch
                    width = value.shape[1]
                    rows = rows[:, rows.shape[1] - width :] if key.startswith("prompt") else rows[:, :width]
                assert torch.equal(value, rows), (k, key)
    with pytest.raises(ConfigError, match="batch_size=7 is the global batch and must divide evenly over 2"):
        on_rank(create_text_datamodule(source, **{**options, "batch_size": 7}), 0, 2).train_dataloader()


def test_epochs_reshuffle_and_ordered_loader_is_in_index_order() -> None:
    datamodule = create_text_datamodule("stdlib", block_size=32, batch_size=16, **SMALL_CAPS)
    first, second = batches(datamodule, 0), batches(datamodule, 1)
    assert sorted(torch.cat([b["index"] for b in first]).tolist()) == list(range(datamodule.num_train_samples))
    assert not torch.equal(first[0]["index"], second[0]["index"])
    assert torch.equal(batches(datamodule, 0)[0]["index"], first[0]["index"])
    ordered = torch.cat([b["index"] for b in datamodule.ordered_train_dataloader()])
    assert ordered.tolist() == list(range(datamodule.num_train_samples))
    datamodule.use_augmentation(True)  # the trainer's call; text has nothing to augment
    assert datamodule.has_validation


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_real_dataloader_epoch_over_validation(num_workers: int) -> None:
    datamodule = create_text_datamodule(
        "stdlib-functions", block_size=96, response_bytes=24, eval_batch_size=16, num_workers=num_workers, **SMALL_CAPS
    )
    seen, targets, byte_targets = [], 0, 0
    for batch in datamodule.val_dataloader():
        real = batch["labels"] != IGNORE_INDEX
        assert batch["input_ids"].shape == batch["labels"].shape
        assert not (real & (batch["attention_mask"] == 0)).any()
        seen.extend(batch["index"].tolist())
        targets += int(real.sum())
        byte_targets += int((batch["labels"] >= 3).sum())
    assert seen == list(range(datamodule.num_val_samples))
    assert targets == datamodule.num_val_tokens
    assert datamodule.val_bytes_per_token == byte_targets / targets < 1.0  # each response's eos is no byte
    assert [len(b["index"]) for b in datamodule.test_dataloader()] == [
        len(b["index"]) for b in datamodule.val_dataloader()
    ]


def test_blocks_without_specials_are_exactly_one_byte_per_token(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x" * 1000)
    (tmp_path / "b.txt").write_text("é" * 1000)
    datamodule = create_text_datamodule("folder", path=tmp_path, block_size=16, val_fraction=0.5)
    datamodule.setup()
    assert EOS_ID not in datamodule.val_set.blocks  # one file per split: no separators
    assert datamodule.val_bytes_per_token == 1.0
