"""Token-level LM distillation loss, naive fp32 form vs kdlab's chunked form: peak memory and time, one run.

    python bench/lm_loss_memory.py                        # forward KL, N = 1024 tokens, V = 32000 and 128000
    python bench/lm_loss_memory.py --loss generalized_jsd --tokens 2048 --rounds 3

The naive form is what one writes by hand: upcast both bf16 logit tensors to fp32, ``log_softmax``
both, the divergence elementwise, mean over the unmasked tokens, ``backward()``. The chunked form is
:mod:`kdlab.losses.lm`. Peak memory: each form in a fresh subprocess, the growth of ``ru_maxrss``
(peak RSS, CPU) over the first forward+backward, from its value once the inputs exist. Time: one
more subprocess runs both forms alternately, step by step (one untimed step each first), and keeps
the median of ``--repeats`` steps each, so load on the machine hits both alike. Medians over
``--rounds`` such rounds are reported, with the chunked/naive ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

import torch
from report import machine_line, markdown_table, rich_table
from rich.console import Console

from kdlab.losses.lm import LM_LOSSES

_SCRIPT = textwrap.dedent(
    """
    import json, resource, statistics, sys, time
    import torch
    import torch.nn.functional as F
    from kdlab.losses.lm import LM_LOSSES

    mode, form, name, tokens, vocab, repeats, threads = *sys.argv[1:4], *map(int, sys.argv[4:])
    torch.set_num_threads(threads)
    params = {"generalized_jsd": {"beta": 0.5}, "skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}
    params = params.get(name, {})
    generator = torch.Generator().manual_seed(0)
    shape = (4, tokens // 4, vocab)
    # Drawn in place in bf16: no fp32 temporary raises the peak before the baseline is read.
    student = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 3, generator=generator).requires_grad_()
    teacher = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 3, generator=generator)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[0, -shape[1] // 8 :] = False  # some padding


    def naive():
        log_q = F.log_softmax(student.float(), dim=-1)
        log_p = F.log_softmax(teacher.float(), dim=-1)
        p, q = log_p.exp(), log_q.exp()
        if name == "forward_kl":
            per_token = (p * (log_p - log_q)).sum(-1)
        elif name == "reverse_kl":
            per_token = (q * (log_q - log_p)).sum(-1)
        elif name == "generalized_jsd":
            log_m = torch.log(0.5 * p + 0.5 * q)
            per_token = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
        elif name == "skew_forward_kl":
            per_token = (p * (log_p - torch.log(0.1 * p + 0.9 * q))).sum(-1)
        elif name == "skew_reverse_kl":
            per_token = (q * (log_q - torch.log(0.1 * q + 0.9 * p))).sum(-1)
        else:
            per_token = 0.5 * (p - q).abs().sum(-1)
        return (per_token * mask).sum() / mask.sum()


    def step(form):
        student.grad = None
        loss = naive() if form == "naive" else LM_LOSSES[name](student, teacher, mask, **params)
        loss.backward()
        return loss.item()


    if mode == "peak":
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = step(form)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"peak_mib": peak_kib / 1024, "loss": loss}))
    else:  # both forms in this process, alternating step by step, after one untimed step each
        seconds = {"naive": [], "chunked": []}
        for round_ in range(repeats + 1):
            for form in seconds:
                start = time.perf_counter()
                step(form)
                if round_:
                    seconds[form].append(time.perf_counter() - start)
        print(json.dumps({form: statistics.median(values) for form, values in seconds.items()}))
    """
)


def run(mode: str, form: str, name: str, tokens: int, vocab: int, repeats: int, threads: int) -> dict:
    """One fresh process: ``peak`` of one form (MiB of RSS growth), or ``time`` of both (median seconds)."""
    command = [sys.executable, "-c", _SCRIPT, mode, form, name, str(tokens), str(vocab), str(repeats), str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", default="forward_kl", choices=sorted(LM_LOSSES))
    parser.add_argument("--tokens", type=int, default=1024, help="N = batch x sequence tokens (batch 4)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000])
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per form and vocabulary")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process after the first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    rows = []
    for vocab in args.vocab:
        peaks: dict[str, list[dict]] = {"naive": [], "chunked": []}
        times = []
        for round_ in range(args.rounds):
            for form in peaks:
                peaks[form].append(run("peak", form, args.loss, args.tokens, vocab, 0, args.threads))
            times.append(run("time", "both", args.loss, args.tokens, vocab, args.repeats, args.threads))
            print(f"V={vocab}: round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        naive, chunked = (
            {
                "peak_mib": statistics.median(r["peak_mib"] for r in peaks[form]),
                "loss": peaks[form][0]["loss"],
                "seconds": statistics.median(t[form] for t in times),
            }
            for form in ("naive", "chunked")
        )
        fp32_copy_mib = args.tokens * vocab * 4 / 2**20
        rows.append(
            [
                f"{vocab:,}",
                f"{fp32_copy_mib:.0f}",
                f"{naive['peak_mib']:.0f}",
                f"{chunked['peak_mib']:.0f}",
                f"{chunked['peak_mib'] / naive['peak_mib']:.2f}",
                f"{1000 * naive['seconds']:.0f}",
                f"{1000 * chunked['seconds']:.0f}",
                f"{chunked['seconds'] / naive['seconds']:.2f}",
                f"{abs(chunked['loss'] - naive['loss']) / abs(naive['loss']):.1e}",
            ]
        )

    header = (
        "V",
        "fp32 [N,V] (MiB)",
        "naive peak (MiB)",
        "chunked peak (MiB)",
        "peak ratio",
        "naive step (ms)",
        "chunked step (ms)",
        "time ratio",
        "loss rel. diff",
    )
    Console().print(rich_table(f"{args.loss}, N = {args.tokens} bf16 tokens, forward + backward", header, rows))
    print(
        f"\n{args.loss}, N = {args.tokens}, {args.rounds} rounds x {args.repeats} timed steps (medians), "
        f"{args.threads} threads; {machine_line()}\n"
    )
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
