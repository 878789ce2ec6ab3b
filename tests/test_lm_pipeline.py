"""The causal-LM distillation path (kdlab/lm): every registered token loss trains, the pipeline
runs end to end with presets and with local Hugging Face models, the soft-label store at k = V is
online KD, seqKD and GKD run, bad configs fail before anything is written, resume, the table, and
sharded/DDP training on 2 CPU processes.

Everything uses the gpt-tiny preset (or tiny random Llama/GPT-2 configs) and a few kB of the
standard library's sources, so nothing is downloaded and each end-to-end run takes seconds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.catalog import load_lm_experiment
from kdlab.data.byte_tokens import byte_tokenizer
from kdlab.data.text import create_text_datamodule
from kdlab.errors import ConfigError, KdlabError
from kdlab.lm.config import DistillConfig, GenerationConfig, _lm_recipe
from kdlab.lm.models import LMModelConfig, build_lm, save_student
from kdlab.lm.system import LMDistillation
from kdlab.losses.lm import LM_LOSSES

KDLAB = str(Path(sys.executable).parent / "kdlab")
QUIET = ["runtime.wandb=disabled", "runtime.progress=false", "runtime.threads=1", "runtime.accelerator=cpu"]
# gpt-tiny teacher and student, ~12 kB of training text in 64-byte blocks: a run is seconds
TINY = [
    "teacher.model.preset=gpt-tiny",
    "student.model.preset=gpt-tiny",
    "data.block_size=64",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "data.options.max_train_bytes=12000",
    "data.options.max_val_bytes=4000",
    "teacher.train.epochs=1",
    "student.train.epochs=1",
]
SMALL_GENERATION = ["distill.generation.prompt_tokens=16", "distill.generation.max_new_tokens=8"]


def kdlab(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [KDLAB, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def lm_run(runs: Path, experiment: str, *overrides: str, env: dict[str, str] | None = None) -> str:
    return kdlab("run", experiment, f"runtime.runs_dir={runs}", *TINY, *overrides, *QUIET, env=env).stdout


def student_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("lm-students/*/metrics.json"))


def metrics_at(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def only_student(runs: Path) -> dict[str, Any]:
    (run_dir,) = student_dirs(runs)
    return metrics_at(run_dir)


def assert_finite(metrics: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert key in metrics and math.isfinite(float(metrics[key])), (key, metrics.get(key))


def plan_of(runs: Path, experiment: str, *overrides: str) -> Any:
    from kdlab.lm.pipeline import plan_lm

    return plan_lm(load_lm_experiment(experiment, [f"runtime.runs_dir={runs}", *TINY, *overrides, *QUIET]))


# -- 1. every registered loss trains -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm() -> dict[str, Any]:
    """One fixed batch of stdlib bytes and a gpt-tiny teacher (random, so its targets are far
    from a differently seeded student's)."""
    datamodule = create_text_datamodule(
        "stdlib",
        tokenizer=byte_tokenizer(),
        block_size=32,
        batch_size=8,
        eval_batch_size=8,
        max_train_bytes=4000,
        max_val_bytes=1000,
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.ordered_train_dataloader()))
    teacher = build_lm(LMModelConfig(preset="gpt-tiny"), seed=1).eval()
    return {"datamodule": datamodule, "batch": batch, "teacher": teacher}


def tiny_system(tiny_lm: dict[str, Any], loss: str, on_policy: float = 0.0, store: Any = None) -> LMDistillation:
    datamodule = tiny_lm["datamodule"]
    distill = DistillConfig(
        loss=loss,
        sft_weight=1.0 if loss == "none" else 0.0,
        on_policy=on_policy,
        generation=GenerationConfig(prompt_tokens=8, max_new_tokens=8),
    )
    return LMDistillation(
        build_lm(LMModelConfig(preset="gpt-tiny"), seed=0),
        tiny_lm["teacher"] if loss != "none" else None,
        distill,
        _lm_recipe(1, 3e-3),
        pad_token_id=int(datamodule.pad_token_id),
        eos_token_id=datamodule.eos_token_id,
        store=store,
        seed=0,
    )


def train_by_hand(system: LMDistillation, batch: dict[str, torch.Tensor], steps: int = 6) -> list[float]:
    """``steps`` AdamW steps on one batch; the weighted loss of each step."""
    optimizer = torch.optim.AdamW(system.trainable_parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        terms = system.loss_terms(batch, step)
        assert terms and all(torch.isfinite(t).all() for t in terms.values()), terms
        loss = sum(system.weights[name] * term for name, term in terms.items())
        optimizer.zero_grad()
        loss.backward()
        for parameter in system.trainable_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses), losses
    return losses


def assert_goes_down(losses: list[float]) -> None:
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("loss", [*LM_LOSSES, "none"])
def test_every_registered_loss_and_sft_trains(tiny_lm: dict[str, Any], loss: str) -> None:
    system = tiny_system(tiny_lm, loss)
    teacher_before = [p.clone() for p in tiny_lm["teacher"].parameters()]
    assert_goes_down(train_by_hand(system, tiny_lm["batch"]))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, tiny_lm["teacher"].parameters(), strict=True))
    assert all(not p.requires_grad for p in system.teachers.parameters())


def test_on_policy_batches_train(tiny_lm: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """GKD with lambda 0.5: some steps score the student's own samples, and the loss still falls."""
    import kdlab.lm.system as lm_system

    generated = []
    original = lm_system.sample_continuations

    def counting(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = original(*args, **kwargs)
        generated.append(out)
        return out

    monkeypatch.setattr(lm_system, "sample_continuations", counting)
    system = tiny_system(tiny_lm, "generalized_jsd", on_policy=0.5)
    losses = train_by_hand(system, tiny_lm["batch"], steps=8)
    assert 0 < len(generated) < 8, "lambda 0.5 over 8 steps: some on-policy batches, not all"
    assert all((g["labels"] != -100).sum() > 0 for g in generated)
    assert_goes_down(losses)


def test_store_fed_kd_trains_and_equals_online_kd_at_k_equal_v(tiny_lm: dict[str, Any], tmp_path: Path) -> None:
    from kdlab.lm.store import LMSoftLabelStore, write_lm_store

    datamodule, batch = tiny_lm["datamodule"], tiny_lm["batch"]
    path = tmp_path / "store"
    write_lm_store(tiny_lm["teacher"], datamodule.ordered_train_dataloader(), path, k=259, dtype="float32")
    store = LMSoftLabelStore(path)
    stored, online = tiny_system(tiny_lm, "forward_kl", store=store), tiny_system(tiny_lm, "forward_kl")
    logits = torch.randn(*batch["input_ids"].shape, 259)
    with torch.no_grad():
        a, b = stored.kd_term(logits, batch, on_policy=False), online.kd_term(logits, batch, on_policy=False)
    assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-6)
    assert_goes_down(train_by_hand(stored, batch))


# -- 5. errors before training ---------------------------------------------------------------------
def word_level_teacher(directory: Path) -> Path:
    """A GPT-2 teacher whose tokenizer is word-level (built in memory): not the byte vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(["def", "return", "self", "if"])}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = GPT2Config(
        vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=1
    )
    torch.manual_seed(0)
    return save_student(GPT2LMHeadModel(config), tokenizer, directory)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["distill.loss=fkl"],
            r"unknown distillation loss \(distill.loss\) 'fkl'.*valid: forward_kl, generalized_jsd, none, reverse_kl",
        ),
        (["distill.loss=generalized_jsd", "distill.params.gamma=1"], r"gamma.*valid: beta"),
        (["distill.loss=reverse_kl", "store.source=cache"], r"store.source=cache.*forward_kl only"),
        (["distill.loss=none", "distill.sft_weight=1", "distill.on_policy=0.5"], r"on_policy needs a distillation"),
        (["store.dtype=float64"], r"unknown store.dtype 'float64'"),
    ],
)
def test_bad_lm_configs_fail_before_anything_is_written(tmp_path: Path, overrides: list[str], message: str) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(KdlabError, match=message):  # ConfigError, or UnknownNameError for the name
        plan_of(runs, "lm-stdlib-kd", *overrides)
    assert not runs.exists()


def test_a_teacher_with_another_vocabulary_fails_naming_the_mapping(tmp_path: Path) -> None:
    teacher = word_level_teacher(tmp_path / "word-teacher")
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="vocabularies differ") as error:
        plan_of(runs, "lm-stdlib-kd", f"teacher.model.path={teacher}", "teacher.model.preset=null")
    assert "distill.vocab_mapping" in str(error.value) and "shared-tokens" in str(error.value)
    assert not runs.exists()


# -- 6. dry run ------------------------------------------------------------------------------------
def test_dry_run_lists_the_teacher_and_student_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    out = kdlab("run", "lm-stdlib-kd", "--dry-run", f"runtime.runs_dir={runs}", *TINY, *QUIET).stdout
    plan = plan_of(runs, "lm-stdlib-kd")
    assert f"teacher run: {plan.teacher_run.dir}" in out.replace("\n", "")
    assert f"student run: {plan.student_run.dir}" in out.replace("\n", "")
    assert not runs.exists() or not any(runs.rglob("metrics.json"))


# -- 2. local Hugging Face models ------------------------------------------------------------------
def tiny_llama(directory: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return save_student(LlamaForCausalLM(config), byte_tokenizer(), directory)


def tiny_gpt2(directory: Path, seed: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2, n_positions=256, pad_token_id=0)
    torch.manual_seed(seed)
    return save_student(GPT2LMHeadModel(config), byte_tokenizer(), directory)


@pytest.mark.slow
@pytest.mark.parametrize("student_kind", ["llama", "gpt2"])
def test_local_hf_teacher_and_student_end_to_end(tmp_path: Path, student_kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tiny_llama(tmp_path / "teacher", seed=1)
    student = (tiny_llama if student_kind == "llama" else tiny_gpt2)(tmp_path / "student", seed=2)
    runs = tmp_path / "runs"
    overrides = [
        f"teacher.model.path={teacher}",
        "teacher.model.preset=null",
        "teacher.trained=false",
        f"student.model.path={student}",
        "student.model.preset=null",
    ]
    lm_run(runs, "lm-stdlib-kd", *overrides)
    (run_dir,) = student_dirs(runs)
    metrics = metrics_at(run_dir)
    assert_finite(metrics, "test/bpb", "test/agreement", "test/kl")
    assert 0 <= metrics["test/agreement"] <= 100
    (teacher_dir,) = runs.glob("lm-teachers/*")
    assert metrics_at(teacher_dir)["epochs"] == 0, "teacher.trained=false: scored, not trained"

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf", local_files_only=True)
    assert len(tokenizer) == 259
    plan = plan_of(runs, "lm-stdlib-kd", *overrides)
    assert plan.student_run.dir == run_dir
    planned = plan.student.eval()
    planned.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    ids = torch.tensor([tokenizer("def f(x):\n    return x + 1\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, planned(input_ids=ids).logits)


# -- 3. a store with every token is online KD ------------------------------------------------------
@pytest.mark.slow
def test_store_with_k_equal_v_gives_the_online_kd_student(tmp_path: Path) -> None:
    """k = V = 259 log-probs in float32: the store holds the teacher's whole distribution (the
    residual bucket is empty), so the student trains on the same targets as from the teacher's
    forward pass, up to float rounding of the stored log-softmax. Measured on CPU: the first kd
    term and the final students' test/bpb, test/kl agree to the last bit. Tolerance 1e-5
    relative: room for a different reduction order (another CPU, threads), far below what a
    wrong target (float16 rounding ~1e-3, a dropped token, a shifted position) changes."""
    from kdlab.lm.pipeline import build_lm_system, ensure_lm_teacher, ensure_store

    runs = tmp_path / "runs"
    store = ["store.k=259", "store.dtype=float32"]
    lm_run(runs, "lm-stdlib-store", *store)
    lm_run(runs, "lm-stdlib-store", *store, "store.source=model")
    assert len(list(runs.glob("lm-teachers/*"))) == 1, "both students share one teacher run"
    assert len(list(runs.glob("lm-stores/*"))) == 1 and len(student_dirs(runs)) == 2
    cached_plan = plan_of(runs, "lm-stdlib-store", *store)
    online_plan = plan_of(runs, "lm-stdlib-store", *store, "store.source=model")
    cached, online = metrics_at(cached_plan.student_run.dir), metrics_at(online_plan.student_run.dir)
    for key in ("test/bpb", "test/kl", "val/bpb"):
        assert_finite(cached, key)
        assert cached[key] == pytest.approx(online[key], rel=1e-5), key

    # the first step's kd term, store-fed and online, from the same fresh student
    ensure_lm_teacher(cached_plan)
    soft_labels = ensure_store(cached_plan)
    config = cached_plan.config
    batch = next(iter(cached_plan.datamodule.train_dataloader()))
    fed = build_lm_system(
        cached_plan, config.distill, config.student.train, cached_plan.student, cached_plan.teacher, soft_labels
    )
    plain = build_lm_system(
        cached_plan, config.distill, config.student.train, cached_plan.student, cached_plan.teacher, None
    )
    with torch.no_grad():
        logits = fed.student(input_ids=batch["input_ids"]).logits
        a, b = fed.kd_term(logits, batch, on_policy=False), plain.kd_term(logits, batch, on_policy=False)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


# -- 4. seqKD and GKD ------------------------------------------------------------------------------
@pytest.mark.slow
def test_seqkd_generations_are_made_once_and_reused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    lm_run(runs, "lm-stdlib-seqkd", *SMALL_GENERATION)
    (generations,) = runs.glob("lm-generations/*")
    samples = torch.load(generations / "generations.pt", weights_only=True)
    assert samples["input_ids"].shape[0] > 0 and (samples["labels"] != -100).any()
    stamp = (generations / "generations.pt").stat().st_mtime_ns
    # loss none: trained on the teacher's text, not its logits; scored against the teacher still
    assert_finite(only_student(runs), "test/bpb", "val/bpb", "test/nll", "test/agreement", "test/kl")
    lm_run(runs, "lm-stdlib-seqkd", *SMALL_GENERATION, "student.train.optimizer.lr=0.002")
    assert len(student_dirs(runs)) == 2
    assert list(runs.glob("lm-generations/*")) == [generations]
    assert (generations / "generations.pt").stat().st_mtime_ns == stamp, "the second student regenerated"
    for run_dir in student_dirs(runs):
        assert_finite(metrics_at(run_dir), "test/bpb")


@pytest.mark.slow
def test_gkd_fully_on_policy_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    lm_run(runs, "lm-stdlib-gkd", "distill.on_policy=1.0", *SMALL_GENERATION)
    assert_finite(only_student(runs), "test/bpb", "test/agreement", "test/kl", "val/bpb")


# -- 7. resume -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_lm_student_resumes_to_the_uninterrupted_numbers(tmp_path: Path) -> None:
    from test_resume import kill_after_epoch

    epochs = ["student.train.epochs=4", "runtime.deterministic=true"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    lm_run(whole, "lm-stdlib-kd", *epochs)
    shutil.copytree(whole / "lm-teachers", killed / "lm-teachers")
    command = [KDLAB, "run", "lm-stdlib-kd", f"runtime.runs_dir={killed}", *TINY, *epochs, *QUIET]
    killed_at = kill_after_epoch(command, tmp_path, "killed/lm-students/*/checkpoints/last.ckpt", 0, 4)
    assert not list(killed.glob("lm-students/*/metrics.json"))
    lm_run(killed, "lm-stdlib-kd", *epochs)
    resumed, uninterrupted = only_student(killed), only_student(whole)
    assert resumed["attempts"] == 2 and resumed["resumed_from_epoch"] == killed_at
    for key in ("test/bpb", "test/kl", "test/agreement", "val/bpb"):
        assert resumed[key] == uninterrupted[key], key


# -- 8. the table ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_table_renders_the_runs_numbers(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    only = "forward_kl,sft,teacher"
    kdlab("table", "lm-distill-mini", "--only", only, "--out", str(out), f"runtime.runs_dir={runs}", *TINY, *QUIET)
    stem = out / "lm-distill-mini"
    for suffix in (".md", ".csv", ".png", ".json"):
        assert stem.with_suffix(suffix).is_file(), suffix
    cells = json.loads(stem.with_suffix(".json").read_text())
    cells = cells["cells"] if isinstance(cells, dict) else cells
    done = [c for c in cells if c["metrics"]]
    assert done and not [c for c in cells if c["error"]]
    labels = {c["label"] for c in done}
    assert {"Student alone (SFT)", "Forward KL"} <= labels and any(label.startswith("Teacher") for label in labels)
    assert "Reverse KL" not in labels
    with open(stem.with_suffix(".csv"), newline="") as handle:
        rows = {row["label"]: row for row in csv.DictReader(handle)}
    for cell in done:
        on_disk = metrics_at(Path(cell["run_dir"]))
        assert on_disk["test/bpb"] == pytest.approx(cell["metrics"]["test/bpb"])
        assert float(rows[cell["label"]]["bpb_mean"]) == pytest.approx(on_disk["test/bpb"], rel=1e-9)
        assert f"{on_disk['test/bpb']:.3f}" in stem.with_suffix(".md").read_text()


# -- 9. several processes --------------------------------------------------------------------------
def lm_probe(tmp_path: Path, strategy: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    command = [sys.executable, str(Path(__file__).parent / "lm_shard_probe.py"), str(tmp_path), strategy]
    overrides = [*TINY, "runtime.devices=2", *QUIET]
    done = subprocess.run(
        [*command, *overrides], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]


def assert_halves(local: int, full: int) -> None:
    assert 0.4 * full <= local <= 0.6 * full, (local, full)


@pytest.mark.slow
def test_fsdp2_shards_the_lm_teacher_and_student(tmp_path: Path) -> None:
    for report in lm_probe(tmp_path, "fsdp2"):
        assert report["world"] == 2 and not report["teacher_in_optimizer"]
        assert_halves(report["teacher"], report["teacher_full"])
        assert_halves(report["student"], report["student_full"])
        assert report["optimizer"] == report["student"]
        assert_finite(report, "loss")


@pytest.mark.slow
def test_zero3_partitions_the_lm_teacher_and_student(tmp_path: Path) -> None:
    for report in lm_probe(tmp_path, "deepspeed_stage_3", {"DS_ACCELERATOR": "cpu"}):
        assert report["world"] == 2 and not report["teacher_in_optimizer"]
        assert_halves(report["teacher"], report["teacher_full"])
        assert_halves(report["student"], report["student_full"])
        assert_halves(report["optimizer"], report["student_full"])
        assert_finite(report, "loss")


@pytest.mark.slow
def test_lm_ddp_on_two_processes_gives_the_one_process_numbers(tmp_path: Path) -> None:
    """Same global batch over 2 DDP ranks (the teacher shared): the student's numbers are the
    one-process numbers up to float summation order; tolerance as in test_distributed (1e-4
    relative on bpb and kl, 0.11 points of agreement). The 61 validation blocks do not divide over
    2 ranks: one rank's last block repeats another's and is not counted (counting it had moved
    test/bpb by 1e-3 relative); the 184 training blocks split evenly."""
    one, two = tmp_path / "one", tmp_path / "two"
    lm_run(one, "lm-stdlib-kd")
    shutil.copytree(one / "lm-teachers", two / "lm-teachers")
    lm_run(two, "lm-stdlib-kd", "runtime.strategy=ddp", "runtime.devices=2")
    a, b = only_student(one), only_student(two)
    for key in ("test/bpb", "val/bpb", "test/kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert b["test/agreement"] == pytest.approx(a["test/agreement"], abs=0.11)
    (run_dir,) = student_dirs(two)
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["attempt-1"], "one writer, one log"


@pytest.mark.slow
def test_a_lora_student_trains_its_adapters_and_is_saved_merged(tmp_path: Path) -> None:
    """student.model.lora.r > 0: only the adapters train; the saved student is a plain HF model
    (no peft wrapper, no adapter keys) whose logits are those of the run's merged weights."""
    from transformers import AutoModelForCausalLM

    runs = tmp_path / "runs"
    lm_run(runs, "lm-stdlib-kd", "student.model.lora.r=4", "student.model.lora.target_modules=[c_attn]")
    (run_dir,) = student_dirs(runs)
    assert_finite(metrics_at(run_dir), "test/bpb", "test/agreement")
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "hf", local_files_only=True)
    assert not any("lora" in name for name, _ in saved.named_parameters())
    merged = build_lm(LMModelConfig(preset="gpt-tiny"), vocab_size=259)
    merged.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    initial = build_lm(LMModelConfig(preset="gpt-tiny"), vocab_size=259, seed=0)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
        # the adapters moved the merged model away from the initial weights
        assert not torch.allclose(saved(input_ids=ids).logits, initial(input_ids=ids).logits, atol=1e-4)


@pytest.mark.slow
def test_an_lm_sweep_runs_every_cell(tmp_path: Path) -> None:
    """`kdlab sweep` over an LM experiment: one student run per grid cell, sharing the teacher."""
    runs = tmp_path / "runs"
    kdlab("sweep", "lm-stdlib-kd", "distill.loss=forward_kl,tvd", f"runtime.runs_dir={runs}", *TINY, *QUIET)
    students = student_dirs(runs)
    assert sorted(metrics_at(d)["loss"] for d in students) == ["forward_kl", "tvd"]
    assert len(list(runs.glob("lm-teachers/*/metrics.json"))) == 1
