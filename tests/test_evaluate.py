"""Evaluation: scoring windows, bits per character of a uniform model, Thai EM/F1 and chrF on known
cases, checkpoint vs its Hugging Face export (bits within 1e-4, same generations), the local
lm-eval task, bad input."""
import gzip
import importlib.util
import json
import math
import os
import shutil

import pytest

from eval_helpers import DENSE, JAI, export_hf, make_checkpoint, make_tokenizer, run_tool


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_dir):
    from megatron_jai import parallel

    root = tmp_path_factory.mktemp("evaluate")
    parallel.initialize(1, 1, seed=5)
    tok = make_tokenizer(shared_dir, str(root / "tok"))
    dense = make_checkpoint(str(root / "dense"), DENSE, tok, seed=0)
    texts = root / "valid_docs.jsonl"  # two Thai and one English validation document, long enough
    with open(texts, "w", encoding="utf-8") as out:  # for several windows of a 128-token context
        for rel, n in (("data/thai/thaigov_v2.valid.jsonl.gz", 2), ("data/english/enwiki.valid.jsonl.gz", 1)):
            with gzip.open(os.path.join(shared_dir, rel), "rt", encoding="utf-8") as f:
                for _, line in zip(range(n), f):
                    out.write(json.dumps({"text": json.loads(line)["text"][:700]}, ensure_ascii=False) + "\n")
    jai = make_checkpoint(str(root / "jai"), JAI, tok, seed=1)
    yield {"root": root, "tokenizer": tok, "dense": dense, "jai": jai, "texts": str(texts),
           "uniform": make_checkpoint(str(root / "uniform"), DENSE, tok, uniform=True),
           "hf": export_hf(dense, str(root / "hf"), tok),
           "hf_jai": export_hf(jai, str(root / "hf_jai"), tok)}
    parallel.destroy()


def test_windows_score_every_target_once():
    from megatron_jai.evaluation.scoring import windows

    for n in (1, 2, 5, 16, 17, 40, 100):
        for context, stride in ((16, None), (16, 15), (16, 4), (2, 1), (8, 7)):
            ws = windows(n, context, stride)
            scored = [p for w in ws for p in range(w.first_scored, w.end)]
            assert scored == list(range(1, n)), (n, context, stride)
            assert all(w.end - w.begin <= context and w.begin < w.first_scored for w in ws)
    assert [(w.begin, w.end) for w in windows(40, 16)] == [(0, 16), (15, 31), (24, 40)]


def test_uniform_model_bits_per_char(models):
    """Output logits all 0: every token costs log2(V) bits, so bits/char = log2(V) x tokens / chars,
    whatever the windows."""
    from megatron_jai.evaluation.runner import EvalOptions, run_task
    from megatron_jai.evaluation.scoring import read_texts
    from megatron_jai.evaluation.tasks import Task
    from megatron_jai.inference.lm import load_language_model

    lm = load_language_model(models["uniform"])
    texts = read_texts(models["texts"])
    tokens = sum(len(lm.tokenizer.encode(t)) for t in texts)
    chars, nbytes = sum(map(len, texts)), sum(len(t.encode()) for t in texts)
    for context, stride in ((1024, None), (64, None), (64, 20)):
        opts = EvalOptions(context=context, stride=stride, batch_size=3, progress=False)
        r = run_task(lm, Task("docs", "bits", models["texts"]), opts)
        assert r["tokens"] == tokens and r["characters"] == chars and r["documents"] == 3
        assert r["bits_per_char"] == pytest.approx(math.log2(DENSE.vocab_size) * tokens / chars, rel=1e-6)
        assert r["bits_per_byte"] == pytest.approx(math.log2(DENSE.vocab_size) * tokens / nbytes, rel=1e-6)
        assert r["perplexity"] == pytest.approx(DENSE.vocab_size, rel=1e-5)
    lm.close()


def test_score_vocab_scores_over_the_first_ids(models, tmp_path, capsys):
    """--score-vocab N: probabilities over ids < N only (a vocabulary-extended model scored as its
    base): log2(N) bits a token for the uniform model; a checkpoint and its export agree; fewer
    competing ids cost fewer bits; a text with an id >= N is refused."""
    from megatron_jai.cli import UserError
    from megatron_jai.evaluation.runner import EvalOptions, run_task
    from megatron_jai.evaluation.tasks import Task
    from megatron_jai.inference.lm import load_language_model

    text = "It was a sunny day and the cat sat on the mat, as it does."
    path = tmp_path / "plain.txt"
    path.write_text(text + "\n")
    lm = load_language_model(models["uniform"])
    ids = [lm.tokenizer.eod] + lm.tokenizer.encode(text)
    n = max(ids) + 1
    assert n < DENSE.vocab_size
    task = Task("plain", "bits", str(path))
    r = run_task(lm, task, EvalOptions(context=16, score_vocab=n, progress=False))
    assert r["bits_per_char"] == pytest.approx(math.log2(n) * (len(ids) - 1) / len(text), rel=1e-6)
    with pytest.raises(UserError, match=f"outside --score-vocab {n - 1}"):
        run_task(lm, task, EvalOptions(score_vocab=n - 1, progress=False))
    with pytest.raises(UserError, match="--score-vocab must be between 2 and"):
        run_task(lm, task, EvalOptions(score_vocab=DENSE.vocab_size + 1, progress=False))
    lm.close()
    bits = {}
    for kind in ("dense", "hf"):
        for vocab in (None, n):
            out = tmp_path / f"{kind}{vocab}.json"
            rc = run_tool("evaluate", "--model", models[kind], "--text", path, "--no-progress",
                          "--output", out, *(["--score-vocab", vocab] if vocab else []))
            assert rc == 0, capsys.readouterr().err
            bits[kind, vocab] = json.loads(out.read_text())["bits_per_char"]["plain.txt"]
    assert abs(bits["dense", n] - bits["hf", n]) < 1e-4
    assert bits["dense", n] < bits["dense", None] - 1e-3


def test_expert_load_of_the_scored_text(models, tmp_path):
    """An MoE checkpoint's bits task reports the share of routed slots per layer and expert for
    that text only: with zero router weights every token ties and takes the same two experts."""
    import torch

    from megatron_jai.checkpoint.dist import TOKENIZER_SUBDIR, save_checkpoint
    from megatron_jai.evaluation.runner import EvalOptions, run_task
    from megatron_jai.evaluation.tasks import Task
    from megatron_jai.inference.lm import load_language_model
    from megatron_jai.model import build_model

    torch.manual_seed(0)
    model = build_model(JAI)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.zero_()
    root = str(tmp_path / "tied_router")
    save_checkpoint(root, [model], JAI, iteration=1)
    shutil.copytree(models["tokenizer"], os.path.join(root, TOKENIZER_SUBDIR))
    task = Task("docs", "bits", models["texts"])
    lm = load_language_model(root)
    lm.log_probs(torch.tensor([[1, 2, 3]]))  # routing before the task is not counted
    r = run_task(lm, task, EvalOptions(context=64, batch_size=1, limit=1, progress=False))
    lm.close()
    load = r["expert_load"]
    assert len(load) == JAI.num_layers and all(row == load[0] for row in load)
    assert sorted(load[0]) == [0.0, 0.0, 0.5, 0.5]
    dense = load_language_model(models["dense"])
    assert "expert_load" not in run_task(dense, task, EvalOptions(limit=1, progress=False))
    dense.close()


def test_thai_exact_match_and_f1():
    from megatron_jai.evaluation.metrics import answer_tokens, exact_match, token_f1

    assert exact_match("๑ พฤศจิกายน พ.ศ. ๒๔๗๖", ["1 พฤศจิกายน พ.ศ. 2476"]) == 1.0  # Thai digits, dots
    assert exact_match("กรุงเทพ มหานคร", ["กรุงเทพมหานคร"]) == 1.0  # Thai spacing is style
    assert exact_match("The Bangkok!", ["bangkok"]) == 1.0
    assert exact_match("กรุงเทพ", ["กรุงเทพมหานคร"]) == 0.0
    assert exact_match("น้ำ", ["น\u0e49\u0e4d\u0e32"]) == 1.0  # sara am typed as nikhahit + sara aa
    # marks stay on their letter (NFKC spells sara am as nikhahit + sara aa)
    assert answer_tokens("น้ำใจ ok") == ["น\u0e49\u0e4d", "\u0e32", "ใ", "จ", "ok"]
    # 6 clusters of 12 in the reference, all predicted: precision 1, recall 1/2
    assert token_f1("กรุงเทพ", ["กรุงเทพมหานคร"]) == pytest.approx(2 / 3)
    assert token_f1("สมชาย", ["กรุงเทพ"]) == 0.0
    assert token_f1("", [""]) == 1.0 and token_f1("", ["ก"]) == 0.0
    assert token_f1("x", ["กรุงเทพ", "x"]) == 1.0  # the best reference counts


def test_chrf_is_sacrebleus():
    import sacrebleu

    from megatron_jai.evaluation.metrics import chrf

    hyps = ["แมวนั่งอยู่บนเสื่อ", "the cat sat on the mat", "สวัสดี"]
    refs = ["แมวนั่งบนเสื่อ", "a cat sat on a mat", "สวัสดีครับ"]
    assert chrf(hyps, refs) == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert chrf(refs, refs) == 100.0


@pytest.mark.parametrize("ckpt,hf", [("dense", "hf"), ("jai", "hf_jai")])
def test_checkpoint_and_hf_export_agree(models, ckpt, hf, tmp_path, capsys):
    results = {}
    for kind in (ckpt, hf):
        out = tmp_path / f"{kind}.json"
        rc = run_tool("evaluate", "--model", models[kind], "--task", "ntrex_tha", "--task", "ntrex_en_th",
                      "--task", "iapp_qa", "--text", models["texts"], "--limit", 2, "--context", 128,
                      "--max-new-tokens", 6, "--no-progress", "--output", out)
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert "bits_per_char" in captured.out and "evaluate: 4 task(s)" in captured.out
        results[kind] = json.loads(out.read_text())
    mc, hf = results[ckpt], results[hf]
    assert mc["model"]["backend"] == "megatron" and hf["model"]["backend"] == "huggingface"
    assert set(mc["bits_per_char"]) == {"ntrex_tha", "valid_docs.jsonl"}
    for name, value in mc["bits_per_char"].items():
        assert abs(value - hf["bits_per_char"][name]) < 1e-4, name
        assert 1 < value < 3 * math.log2(DENSE.vocab_size)
    assert mc["tasks"]["valid_docs.jsonl"]["tokens"] == hf["tasks"]["valid_docs.jsonl"]["tokens"]
    for task, metric in (("ntrex_en_th", "chrf"), ("iapp_qa", "f1")):
        assert mc["tasks"][task]["items"] == 2
        assert mc["tasks"][task]["examples"] == hf["tasks"][task]["examples"]  # same greedy text
        assert mc["tasks"][task][metric] == pytest.approx(hf["tasks"][task][metric])


def test_lm_eval_local_task(models, tmp_path, capsys):
    out = tmp_path / "lm_eval.json"
    rc = run_tool("evaluate", "--model", models["hf"], "--task", "lm-eval:ntrex_th_mc", "--limit", 4,
                  "--no-progress", "--output", out)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    r = json.loads(out.read_text())["tasks"]["lm-eval:ntrex_th_mc"]
    assert r["items"] == 4 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert "lm-eval:ntrex_th_mc" in captured.out and "acc" in captured.out


def test_ntrex_multiple_choice_rows():
    from megatron_jai.evaluation.tasks import LM_EVAL_TASK_DIR

    spec = importlib.util.spec_from_file_location("ntrex_mc_utils", os.path.join(LM_EVAL_TASK_DIR, "utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    sources, targets = [f"s{i}" for i in range(30)], [f"t{i}" for i in range(30)]
    rows = utils.multiple_choice_rows(sources, targets)
    assert rows == utils.multiple_choice_rows(sources, targets)  # deterministic
    for i, row in enumerate(rows):
        assert row["source"] == f"s{i}" and row["choices"][row["label"]] == f"t{i}"
        assert len(set(row["choices"])) == 4 and row["choices"].count(f"t{i}") == 1
    assert len({row["label"] for row in rows}) == 4  # the answer is not always in one place


def test_bad_input(models, tmp_path, capsys):
    out = tmp_path / "never.json"
    cases = [
        ([models["dense"], "--task", "mmlu"], "unknown task 'mmlu'"),
        ([models["hf"], "--task", "lm-eval:hellaswag"], "unknown lm-eval task 'hellaswag'"),
        ([models["dense"], "--task", "lm-eval:ntrex_th_mc"], "run on Hugging Face directories"),
        ([models["dense"], "--task", "ntrex_tha", "--context", "64", "--stride", "64"], "--stride"),
        ([models["dense"], "--text", str(tmp_path / "missing.txt")], "no such file"),
        ([str(tmp_path), "--task", "ntrex_tha"], "neither a Megatron checkpoint"),
    ]
    for args, message in cases:
        rc = run_tool("evaluate", "--model", *args, "--limit", 1, "--no-progress", "--output", out)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("evaluate.py: error:"), err
        assert message in err[0]
        assert not out.exists()
