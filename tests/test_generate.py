"""Generation: greedy tokens of tools/generate.py (KV cache on and off) equal transformers'
generate() on the Hugging Face export; the cache equals recomputation on a JAI-shaped model (DUS
skips + experts), also at TP/PP/EP; sampling; bad input."""
import json
import os

import pytest
import torch

from conftest import REPO_ROOT, torchrun
from eval_helpers import DENSE, JAI, export_hf, make_checkpoint, make_tokenizer, run_tool

PROMPT = "สวัสดีครับ The weather in Bangkok"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_dir):
    from megatron_jai import parallel

    root = tmp_path_factory.mktemp("generate")
    parallel.initialize(1, 1, seed=5)
    tok = make_tokenizer(shared_dir, str(root / "tok"))
    yield {"root": root, "tokenizer": tok,
           "dense": make_checkpoint(str(root / "dense"), DENSE, tok, seed=0),
           "jai": make_checkpoint(str(root / "jai"), JAI, tok, seed=1)}
    parallel.destroy()


def _hf_greedy(model, ids, stop_ids, use_cache):
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                         use_cache=use_cache, eos_token_id=sorted(stop_ids), pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["dense", "jai"])
def test_greedy_tokens_equal_hf_generate(models, kind, tmp_path, capsys):
    from megatron_jai.data.tokenizer import load_tokenizer
    from megatron_jai.inference.generation import stop_token_ids

    hf_dir = export_hf(models[kind], str(tmp_path / "hf"), models["tokenizer"])
    tok = load_tokenizer(models["tokenizer"])
    ids = tok.encode(PROMPT)
    stops = stop_token_ids(tok)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                 local_files_only=True, dtype=torch.float32).eval()
    reference = _hf_greedy(model, ids, stops, use_cache=True)
    assert reference == _hf_greedy(model, ids, stops, use_cache=False)
    assert len(reference) >= 8
    for cache in (True, False):
        out = tmp_path / f"gen_{cache}.json"
        rc = run_tool("generate", "--load", models[kind], "--prompt", PROMPT, "--max-new-tokens",
                      NEW_TOKENS, "--output", out, *([] if cache else ["--no-kv-cache"]))
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        turn = json.loads(out.read_text())["turns"][0]
        assert turn["prompt_ids"] == ids
        assert turn["ids"] == reference, f"KV cache {'on' if cache else 'off'}"
        assert turn["text"] in captured.out
        assert f"KV cache {'on' if cache else 'off'}" in captured.err and "tokens/s" in captured.err


def test_jai_kv_cache_equals_recomputation(models):
    """Skips and experts under the cache: greedy tokens equal the uncached loop and the argmax of
    one full forward pass over prompt + generation; seeded sampling is the same both ways."""
    from megatron_jai.inference.forward import forward_logits
    from megatron_jai.inference.generation import SamplingParams, StopCondition
    from megatron_jai.inference.lm import load_language_model

    lm = load_language_model(models["jai"])
    ids = lm.tokenizer.encode(PROMPT)
    never = StopCondition()
    for params in (SamplingParams(max_new_tokens=16),
                   SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=7)):
        cached = lm.generate(ids, params, never, use_cache=True)
        assert cached.ids == lm.generate(ids, params, never, use_cache=False).ids
        assert cached.stop_reason == "max_new_tokens" and len(cached.ids) == 16
    greedy = lm.generate(ids, SamplingParams(max_new_tokens=16), never).ids
    full = forward_logits(lm.model, torch.tensor([ids + greedy]))[0, :, : lm.vocab_size]
    assert full[len(ids) - 1: -1].argmax(-1).tolist() == greedy
    lm.close()


def test_only_decodable_ids_are_generated(models, tmp_path):
    """A model with more rows than its tokenizer has ids (Phi-3: 32,064 vs 32,011) never emits the
    extra ids, on either backend."""
    from megatron_jai.inference.generation import SamplingParams, StopCondition, hf_generate
    from megatron_jai.inference.lm import load_language_model

    lm = load_language_model(models["dense"])
    ids = lm.tokenizer.encode(PROMPT)
    free = lm.generate(ids, SamplingParams(max_new_tokens=32, temperature=2.0), StopCondition()).ids
    limit = sorted(free)[len(free) // 2]  # half of what it generates unrestricted is out of range
    lm.tokenizer.vocab_size = limit  # this model's tokenizer only, as if it were a smaller one
    for params in (SamplingParams(max_new_tokens=32), SamplingParams(max_new_tokens=32, temperature=2.0)):
        assert max(lm.generate(ids, params, StopCondition()).ids) < limit
    hf = export_hf(models["dense"], str(tmp_path / "hf"), models["tokenizer"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    gen = hf_generate(model, lm.tokenizer, ids, SamplingParams(max_new_tokens=32, temperature=2.0),
                      StopCondition(), 1024)
    assert max(gen.ids) < limit
    lm.close()


def test_sampling():
    from megatron_jai.inference.generation import SamplingParams, sample_token

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams()) == 0
    assert all(sample_token(logits, SamplingParams(temperature=1.0, top_k=1), gen) == 0 for _ in range(20))
    # probabilities 0.56 0.21 0.13 0.08 0.03: top_p 0.8 needs tokens 0, 1 and 2 (0.56 + 0.21 < 0.8)
    draws = [sample_token(logits, SamplingParams(temperature=1.0, top_p=0.8), gen) for _ in range(600)]
    assert set(draws) == {0, 1, 2}
    draws = [sample_token(logits, SamplingParams(temperature=1.0, top_p=0.7), gen) for _ in range(300)]
    assert set(draws) == {0, 1}
    draws = torch.tensor([sample_token(logits, SamplingParams(temperature=2.0), gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits / 2.0, 0), atol=0.03)
    again = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    assert [sample_token(logits, p, again[0]) for _ in range(30)] == \
        [sample_token(logits, p, again[1]) for _ in range(30)]


def test_chat_prompt(models):
    from megatron_jai.data.tokenizer import load_tokenizer
    from megatron_jai.inference.chat import chat_prompt_ids, render_chat

    tok = load_tokenizer(models["tokenizer"])
    text = render_chat(tok, [{"role": "user", "content": "สวัสดี"}])
    assert text == "<s><|user|>\nสวัสดี<|end|>\n<|assistant|>\n"
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "สวัสดี"}])
    sp = tok.special_tokens
    newline = tok.encode("\n")
    assert ids == [sp["<s>"], sp["<|user|>"], *tok.encode("\nสวัสดี"), sp["<|end|>"], *newline,
                   sp["<|assistant|>"], *newline]


def test_bad_input(models, tmp_path, capsys):
    out = tmp_path / "never.json"
    cases = [
        (["--prompt", "x " * 2000], "the prompt has"),  # longer than the 1,024-token context
        (["--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["--prompt", "   "], "empty"),
        ([], "--prompt"),
    ]
    for extra, message in cases:
        rc = run_tool("generate", "--load", models["dense"], "--output", out, *extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0] and err[0].startswith("generate.py: error:")
        assert not out.exists()
    bare = tmp_path / "bare"  # a checkpoint without its tokenizer
    os.makedirs(bare)
    for name in os.listdir(models["dense"]):
        if name != "tokenizer":
            os.symlink(os.path.join(models["dense"], name), bare / name)
    assert run_tool("generate", "--load", bare, "--prompt", "hi") == 2
    assert "pass --tokenizer" in capsys.readouterr().err


@pytest.mark.dist
def test_generation_at_tp_pp_ep_equals_single_rank(models, tmp_path):
    """One torchrun launch: TP=2, PP=2 (both skips cross the stage boundary) and EP=2 on the
    JAI-shaped model give the single rank's greedy tokens (cache on and off) and log-probs."""
    from megatron_jai.inference.generation import SamplingParams, StopCondition
    from megatron_jai.inference.lm import load_language_model

    lm = load_language_model(models["jai"])
    ids = lm.tokenizer.encode(PROMPT)
    reference = {"prompt": ids,
                 "greedy": lm.generate(ids, SamplingParams(max_new_tokens=12), StopCondition()).ids,
                 "log_probs": lm.log_probs(torch.tensor([ids])).tolist()}
    lm.close()
    ref_file = tmp_path / "reference.json"
    ref_file.write_text(json.dumps(reference))
    out = torchrun(2, os.path.join(REPO_ROOT, "tests", "dist", "generate_layouts.py"),
                   models["jai"], ref_file).stdout
    for layout in ("TP=2 PP=1 EP=1", "TP=1 PP=2 EP=1", "TP=1 PP=1 EP=2"):
        assert f"OK {layout}" in out, out
