"""posttrain_jai.py sft / dpo: the same loop as pretraining with another objective (issue 9).

A tiny DUS + MoE model (4 layers, skip 0->3, 4 experts top-2) with the Phi-3 vocabulary, on slices
of the real chat data of shared/data/post. Gradients are compared through one optimizer step with
Adam's epsilon far above every gradient (the update is then lr * g / (|g| + eps): a function of
the gradient alone), read back from the saved checkpoints.
"""
import gzip
import json
import math
import os

import pytest
import torch

from conftest import REPO_ROOT, run_python, torchrun

POSTTRAIN = os.path.join(REPO_ROOT, "posttrain_jai.py")
PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")
CHECK = os.path.join(REPO_ROOT, "tests", "dist", "posttrain_check.py")
# One optimizer step that reads out the gradient (see the module docstring).
GRADIENT_STEP = ["--lr", "1e2", "--min-lr", "0", "--adam-eps", "1e3", "--weight-decay", "0",
                 "--clip-grad", "0", "--warmup-iters", "0"]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def model_tensors(root, iteration):
    from megatron_jai.checkpoint.stream import CheckpointReader

    reader = CheckpointReader(os.path.join(root, f"iter_{iteration:07d}"))
    return {k: reader.read(k) for k in reader.keys()
            if k.startswith(("embedding.", "decoder.", "output_layer."))
            and not k.endswith("_extra_state")}


def assert_same_step(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), \
            (key, float((a[key] - b[key]).abs().max()))


@pytest.fixture(scope="module")
def chat(shared_dir, tmp_path_factory):
    """Chat datasets (SFT: Thai + English; DPO: Thai, held-out English), the tiny model and an
    init checkpoint (2 pretraining steps on the SFT tokens) that carries the Phi-3 tokenizer."""
    from megatron_jai.config import SkipConnection
    from megatron_jai.presets import TINY
    from megatron_jai.data.chat import preprocess_chat

    work = tmp_path_factory.mktemp("posttrain")
    tokenizer = os.path.join(shared_dir, "tokenizers", "phi3")
    slices = {"th_sft": ("th_sft_wangchanglm_oasst1", 40, "sft"),
              "en_sft": ("en_sft_dolly_open_qa", 40, "sft"),
              "th_dpo": ("th_dpo_wangchanglm_crowd", 24, "dpo"),
              "en_dpo": ("en_dpo_hh_rlhf_harmless_test", 16, "dpo")}
    data = {}
    for name, (source, n, kind) in slices.items():
        src = os.path.join(shared_dir, "data", "post", f"{source}.jsonl.gz")
        with gzip.open(src, "rt", encoding="utf-8") as f, open(work / f"{name}.jsonl", "w") as o:
            o.writelines(line for _, line in zip(range(n), f))
        preprocess_chat(kind, [str(work / f"{name}.jsonl")], str(work / name), tokenizer,
                        seq_length=128, max_bad_fraction=0.1, progress=False)
        data[name] = str(work / name)
    cfg = TINY.replace(name="tiny-chat", vocab_size=32064, num_experts=4, moe_top_k=2,
                       ffn_hidden_size=96, skip_connections=(SkipConnection(0, 3, 0.5, 0.25),))
    cfg.save(str(work / "tiny_chat.json"))
    init = work / "init"
    run_python(PRETRAIN, "--model", work / "tiny_chat.json", "--data-path", data["en_sft"],
               "--tokenizer", tokenizer, "--train-iters", 2, "--seq-length", 64,
               "--global-batch-size", 4, "--micro-batch-size", 2, "--save", init,
               "--data-cache-dir", work / "cache")
    common = ["--init-from", str(init), "--seq-length", "128", "--global-batch-size", "4",
              "--log-interval", "1", "--data-cache-dir", str(work / "cache")]
    return {"work": work, "init": str(init), "tokenizer": tokenizer, "common": common, **data}


def test_dpo_loss_equals_plain_torch():
    from megatron_jai.training.objectives.dpo_losses import dpo_loss

    torch.manual_seed(0)
    for loss_type in ("sigmoid", "ipo"):
        inputs = [torch.randn(7, dtype=torch.float64, requires_grad=True) for _ in range(4)]
        losses, chosen, rejected = dpo_loss(*inputs, beta=0.3, loss_type=loss_type)
        pc, pr, rc, rr = inputs
        h = (pc - rc) - (pr - rr)
        want = -torch.log(1 / (1 + torch.exp(-0.3 * h))) if loss_type == "sigmoid" \
            else (h - 1 / 0.6) ** 2
        assert torch.allclose(losses, want)
        grads = torch.autograd.grad(losses.sum(), inputs)
        want_grads = torch.autograd.grad(want.sum(), inputs)
        for g, w in zip(grads, want_grads):
            assert torch.allclose(g, w)
        assert torch.allclose(chosen, 0.3 * (pc - rc)) and torch.allclose(rejected, 0.3 * (pr - rr))


@pytest.mark.dist
def test_sft_masked_mean_and_dpo_reference_checks(chat):
    out = run_python(CHECK, chat["init"], chat["th_sft"], chat["th_dpo"], chat["tokenizer"],
                     chat["work"])
    assert "OK sft masked mean" in out.stdout and "OK dpo precomputed == live" in out.stdout


@pytest.mark.dist
def test_sft_token_weighted_over_micro_batches_and_dp_and_exact_resume(chat, tmp_path):
    # (The MoE load-balancing loss is not a sum over tokens: it depends on the micro-batching.)
    sft = ["sft", *chat["common"], "--data-path", "0.5", chat["th_sft"], "0.5", chat["en_sft"],
           "--moe-aux-loss-coeff", "0"]
    one = tmp_path / "1x4"
    run_python(POSTTRAIN, *sft, *GRADIENT_STEP, "--micro-batch-size", 1, "--train-iters", 3,
               "--save", one, "--save-interval", 1, "--metrics-file", tmp_path / "1x4.jsonl")
    run_python(POSTTRAIN, *sft, *GRADIENT_STEP, "--micro-batch-size", 2, "--train-iters", 1,
               "--save", tmp_path / "2x2", "--metrics-file", tmp_path / "2x2.jsonl")
    torchrun(2, POSTTRAIN, *sft, *GRADIENT_STEP, "--micro-batch-size", 2, "--train-iters", 1,
             "--save", tmp_path / "dp2", "--metrics-file", tmp_path / "dp2.jsonl")
    losses = [read_metrics(tmp_path / f"{n}.jsonl")[0]["loss"] for n in ("1x4", "2x2", "dp2")]
    assert max(losses) - min(losses) < 1e-6, losses
    first = model_tensors(one, 1)
    assert_same_step(first, model_tensors(tmp_path / "2x2", 1))
    assert_same_step(first, model_tensors(tmp_path / "dp2", 1))
    # Exact resume: 1 step + resume == 3 steps straight.
    run_python(POSTTRAIN, *sft, *GRADIENT_STEP, "--micro-batch-size", 1, "--train-iters", 3,
               "--load", one, "--load-iteration", 1, "--save", tmp_path / "resumed",
               "--metrics-file", tmp_path / "resumed.jsonl")
    straight = read_metrics(tmp_path / "1x4.jsonl")
    resumed = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["step"] for r in resumed] == [2, 3]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[1:]]
    assert os.listdir(one / "tokenizer")  # the run's tokenizer travels with the checkpoint


@pytest.mark.dist
def test_dpo_layouts_resume_and_stale_reference(chat, tmp_path):
    dpo = ["dpo", *chat["common"], "--data-path", chat["th_dpo"], "--micro-batch-size", "2"]
    single = tmp_path / "single"
    proc = run_python(POSTTRAIN, *dpo, *GRADIENT_STEP, "--train-iters", 3, "--save", single,
                      "--save-interval", 1, "--valid-data-path", chat["en_dpo"],
                      "--eval-interval", 3, "--eval-iters", 1,
                      "--metrics-file", tmp_path / "single.jsonl")
    records = read_metrics(tmp_path / "single.jsonl")
    # Policy = reference at the first step: log 2, no reward, no margin.
    assert abs(records[0]["loss"] - math.log(2)) < 1e-6
    assert records[0]["rewards/chosen"] == records[0]["margin"] == records[0]["accuracy"] == 0
    for key in ("rewards/chosen", "rewards/rejected", "margin", "accuracy", "valid_accuracy",
                "valid_margin"):
        assert key in records[-1], key
    refs = [n for n in os.listdir(chat["work"]) if n.startswith("th_dpo.dpo_ref.")]
    assert len(refs) == 1  # (computed here, or by the check above: same reference and data)
    assert [n for n in os.listdir(chat["work"]) if n.startswith("en_dpo.dpo_ref.")]

    # TP=2, PP=2 (the skip 0->3 crosses the stage boundary) and EP=2: the same loss and the same
    # gradients (step) as one rank; they reuse the stored reference log-probs.
    first = model_tensors(single, 1)
    for layout in (["--tp", "2"], ["--pp", "2"], ["--ep", "2"]):
        name = "x".join(layout).replace("--", "")
        proc = torchrun(2, POSTTRAIN, *dpo, *GRADIENT_STEP, *layout, "--train-iters", 1,
                        "--save", tmp_path / name, "--metrics-file", tmp_path / f"{name}.jsonl")
        assert "reference log-probs:" not in proc.stdout
        assert abs(read_metrics(tmp_path / f"{name}.jsonl")[0]["loss"] - records[0]["loss"]) \
            < 1e-6, layout
        assert_same_step(first, model_tensors(tmp_path / name, 1), atol=2e-6)

    # Exact resume.
    run_python(POSTTRAIN, *dpo, *GRADIENT_STEP, "--train-iters", 3, "--load", single,
               "--load-iteration", 1, "--save", tmp_path / "resumed",
               "--metrics-file", tmp_path / "resumed.jsonl")
    resumed = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records[1:]]

    # Reference log-probs that belong to other data are refused (one line, exit 2).
    from megatron_jai.data.chat import preprocess_chat

    stale = str(chat["work"] / "th_dpo_stale")
    preprocess_chat("dpo", [str(chat["work"] / "th_dpo.jsonl")], stale, chat["tokenizer"],
                    seq_length=96, max_bad_fraction=0.5, progress=False)
    os.link(os.path.join(chat["work"], refs[0]),
            stale + refs[0][len("th_dpo"):])
    proc = run_python(POSTTRAIN, *dpo, "--data-path", stale, "--train-iters", 1, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stale reference log-probs" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.dist
def test_eval_only_needs_only_validation_data(chat, tmp_path):
    # SFT: every record of the set once (40 = 10 global batches of 4), nothing trained or saved.
    common = [*chat["common"], "--micro-batch-size", "2", "--eval-only"]
    proc = run_python(POSTTRAIN, "sft", *common, "--valid-data-path", chat["en_sft"],
                      "--eval-iters", 10, "--metrics-file", tmp_path / "sft.jsonl")
    [record] = read_metrics(tmp_path / "sft.jsonl")
    assert record["eval_only"] and math.isfinite(record["valid_loss"])
    assert f"valid_loss {record['valid_loss']:.4f}" in proc.stdout
    # DPO before training: the policy is the reference, so no margin, no accuracy, loss log 2.
    run_python(POSTTRAIN, "dpo", *common, "--valid-data-path", chat["th_dpo"], "--eval-iters", 6,
               "--metrics-file", tmp_path / "dpo.jsonl")
    [record] = read_metrics(tmp_path / "dpo.jsonl")
    assert record["valid_margin"] == record["valid_accuracy"] == 0
    assert abs(record["valid_loss"] - math.log(2)) < 1e-6


def test_plot_draws_a_dpo_panel(tmp_path):
    from megatron_jai.training.plots import plot_runs, read_metrics

    def write(name, **extra):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"step": s, "loss": 0.7 - 0.01 * s, "lr": 1e-4,
                                            "grad_norm": 1.0, "tokens_per_s": 1e3,
                                            **{k: v * s for k, v in extra.items()}}) + "\n"
                                for s in range(1, 5)))
        return read_metrics(str(path))

    sft, dpo = write("sft"), write("dpo", accuracy=0.2, margin=0.1, valid_accuracy=0.1)
    assert plot_runs([sft, dpo], str(tmp_path / "p.png")) == ["loss", "throughput", "lr", "dpo"]
    assert plot_runs([sft], str(tmp_path / "s.png")) == ["loss", "throughput", "lr"]
