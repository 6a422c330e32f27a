"""The one-command recipe on a random tiny Phi-3 (made-up 4 -> 8-layer plan), then a few training
steps of the result under torchrun with EP=2: finite, falling loss."""
import gzip
import json
import os
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT, load_tool, run_cmd, torchrun
from upscale_cli import upscale, upscale_tool

from megatron_jai.upscale.recipe import STAGES

PLAN = "name: tiny8\nblock_size: 1\nmultiplicities: [1, 2, 3, 2]\n"  # skips 1->2, 3->4, 3->5, 6->7


def _tiny_phi3(path, vocab_size=32064, eos=32000):
    """A random HF Phi-3 with Phi-3's 32,064-row vocabulary (the vocab surgery uses its tokenizer)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     pad_token_id=eos, bos_token_id=1, eos_token_id=eos)
    Phi3ForCausalLM(cfg).save_pretrained(path)


def _thai_slice(shared_dir, path, chars=150_000):
    n = 0
    with gzip.open(os.path.join(shared_dir, "data", "thai", "thaigov_v2.valid.jsonl.gz"), "rt",
                   encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in f:
            out.write(line)
            n += len(json.loads(line)["text"])
            if n >= chars:
                break


@pytest.mark.dist
def test_recipe_then_train_ep2(shared_dir, tmp_path, capsys):
    from megatron_jai.checkpoint.stream import CheckpointReader
    from megatron_jai.upscale.plan import load_plan

    hf, corpus, plan, out = tmp_path / "hf", tmp_path / "thai.jsonl", tmp_path / "tiny8.yaml", tmp_path / "M"
    _tiny_phi3(hf)
    _thai_slice(shared_dir, corpus)
    plan.write_text(PLAN)
    stdout, _ = upscale(capsys, "recipe", "jai", "--hf-dir", hf, "--thai-corpus", corpus,
                        "--thai-vocab", 1000, "--target-vocab", 32300, "--plan", plan,
                        "--experts", 4, "--top-k", 2, "--router-std", 0.01, "--threads", 1,
                        "--out", out, "--keep-work")
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/5] {stage}:" in stdout, stdout
    r = CheckpointReader(str(out))
    cfg = r.config
    counts = cfg.parameter_counts()
    assert (cfg.num_layers, cfg.vocab_size, cfg.num_experts, cfg.moe_top_k) == (8, 32300, 4, 2)
    assert cfg.skip_connections == load_plan(str(plan)).skip_connections
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("recipe jai: 8 layers (4 skips), 4 experts top-2, vocab 32300 "
                              "(padded 32384)"), summary
    assert f"{counts['total'] / 1e6:.4g}M total / {counts['active'] / 1e6:.4g}M active" in summary
    assert os.path.isfile(out / "tokenizer" / "tokenizer.model")

    # the chain composes: expert e of new layer i = the base FFN of layer plan.layer_map()[i]
    base = CheckpointReader(str(tmp_path / "M.work" / "0-convert"))
    for new, old in enumerate([0, 1, 1, 2, 2, 2, 3, 3]):
        experts = r.read_layer("decoder.layers.mlp.experts.weight_down", new)
        assert all(torch.equal(experts[e], base.read_layer("decoder.layers.mlp.linear_fc2.weight", old))
                   for e in range(4))
    emb, base_emb = r.read("embedding.word_embeddings.weight"), base.read("embedding.word_embeddings.weight")
    assert torch.equal(emb[:32011], base_emb[:32011])  # every base id keeps its row

    # the recipe trains its Thai BPE with the options of the README's separate steps
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    step = next(line.split("tools/train_tokenizer.py", 1)[1].split()
                for line in readme.splitlines() if "tools/train_tokenizer.py --input" in line)
    separate = vars(load_tool("train_tokenizer").build_parser().parse_args(step))
    trained = json.loads((tmp_path / "M.work" / "thai-bpe" / "train_args.json").read_text())
    for key in ("clean", "json_key", "max_sentences", "character_coverage", "max_piece_length",
                "max_sentence_chars"):
        assert trained[key] == separate[key], (key, trained[key], separate[key])
    recipe_defaults = upscale_tool.build_parser().parse_args(
        ["recipe", "jai", "--hf-dir", "H", "--out", "O"])
    assert recipe_defaults.thai_vocab == separate["vocab_size"]

    # an existing output is refused, and so is a plan deeper than the base model: before any stage
    args = ["recipe", "jai", "--hf-dir", hf, "--thai-corpus", corpus, "--thai-vocab", 1000,
            "--target-vocab", 32300, "--plan", plan, "--threads", 1, "--work-dir", tmp_path / "M.work",
            "--keep-work"]
    assert "already exists" in upscale(capsys, *args, "--out", out, expect_rc=2)[1]
    deep = tmp_path / "deep.yaml"
    deep.write_text("block_size: 2\nmultiplicities: [1, 2, 1]\n")  # a 6-layer base model
    t0 = time.time()
    stdout, err = upscale(capsys, "recipe", "jai", "--hf-dir", hf, "--thai-corpus", corpus,
                          "--plan", deep, "--out", tmp_path / "D", expect_rc=2)
    assert time.time() - t0 < 10 and "[1/" not in stdout, stdout
    assert "is for a 6-layer base model, but the checkpoint has 4 layers" in err, err
    assert not os.path.exists(tmp_path / "D.work")
    # a rerun reuses the stages whose inputs are unchanged: new experts redo only moe, a new
    # plan only dus and moe
    again, _ = upscale(capsys, *args, "--experts", 2, "--top-k", 1, "--out", tmp_path / "M2")
    assert all(f"[{i}/5] {s}: reusing" in again for i, s in enumerate(STAGES[:4], 1)), again
    assert "2 experts top-1" in again.strip().splitlines()[-1]
    args[args.index("--plan") + 1] = tmp_path / "tiny6.yaml"
    (tmp_path / "tiny6.yaml").write_text("block_size: 1\nmultiplicities: [1, 2, 2, 1]\n")
    replanned, _ = upscale(capsys, *args, "--out", tmp_path / "M3")
    assert all(f"[{i}/5] {s}: reusing" in replanned for i, s in enumerate(STAGES[:3], 1))
    assert "[4/5] dus: plan tiny6" in replanned and "[5/5] moe: 4 experts" in replanned, replanned
    assert CheckpointReader(str(tmp_path / "M3")).config.num_layers == 6

    # a few training steps of the upscaled MoE model under expert parallelism
    prefix = tmp_path / "thai"
    run_cmd([sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input",
             corpus, "--output-prefix", prefix, "--tokenizer", out / "tokenizer", "--workers", "1",
             "--no-progress"])
    metrics = tmp_path / "metrics.jsonl"
    torchrun(2, os.path.join(REPO_ROOT, "pretrain_jai.py"), "--init-from", out, "--ep", 2,
             "--data-path", prefix, "--tokenizer", out / "tokenizer", "--train-iters", 8,
             "--seq-length", 64, "--micro-batch-size", 2, "--global-batch-size", 4, "--lr", 3e-3,
             "--warmup-iters", 1, "--log-interval", 1, "--metrics-file", metrics)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 8 and all(map(lambda x: x == x and abs(x) < 1e9, losses)), losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses


def test_recipe_with_the_base_models_own_tokenizer(shared_dir, tmp_path_factory, tmp_path, capsys):
    """A base model whose tokenizer is not Phi-3's (an English BPE of 600 pieces + Phi-3's 11
    specials, in its HF directory): the recipe takes that tokenizer as the base by default."""
    import shutil

    from megatron_jai.checkpoint.stream import CheckpointReader
    from test_tokenizer import make_english_base_tokenizers

    base_tok, ext = make_english_base_tokenizers(tmp_path_factory, shared_dir)
    hf, plan = tmp_path / "hf", tmp_path / "tiny8.yaml"
    _tiny_phi3(hf, vocab_size=611, eos=600)
    for name in ("tokenizer.model", "added_tokens.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(base_tok, name), hf / name)
    plan.write_text(PLAN)
    stdout, _ = upscale(capsys, "recipe", "jai", "--hf-dir", hf, "--tokenizer", ext, "--plan", plan,
                        "--experts", 0, "--out", tmp_path / "M")
    assert "611 -> 1200 ids, 589 new rows" in stdout, stdout
    cfg = CheckpointReader(str(tmp_path / "M")).config
    assert (cfg.num_layers, cfg.vocab_size) == (8, 1200)
