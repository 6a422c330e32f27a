"""Export to Hugging Face (the JAI architecture: skips, experts, RoPE interpolation), loading with
transformers, logit parity with Megatron at TP=2 / PP=2 / EP=2, bit-exact round trips, skip alphas
in train / eval mode, generation with a KV cache and padding, tokenizer export, bad input."""
import json
import os
import shutil

import pytest
import torch

from conftest import REPO_ROOT, load_tool, torchrun
from export_helpers import EXPERTS, JAI, SKIPS, safetensors_dict, save_hf_model, tiny_tokenizer
from megatron_jai import cli
from megatron_jai.checkpoint.convert import hf_to_mcore
from megatron_jai.checkpoint.stream import CheckpointReader
from megatron_jai.hf.export import mcore_to_hf

PARITY = os.path.join(REPO_ROOT, "tests", "dist", "export_parity.py")
# [name, hf_dir, mcore_dir, tp, pp, ep, first_stage_layers, last_stage_layers]
CASES = [
    ["skips+experts", "jai_hf", "jai_mc", 2, 1, 1, None, None],
    ["skips+experts", "jai_hf", "jai_mc", 1, 2, 1, None, None],  # skips 0->2, 1->3 cross
    ["skips+experts", "jai_hf", "jai_mc", 1, 2, 1, 1, 3],  # uneven: 0->2 crosses, 1->3 not
    ["skips+experts", "jai_hf", "jai_mc", 1, 1, 2, None, None],
    ["skips", "skips_hf", "skips_mc", 1, 2, 1, None, None],
    ["skips", "skips_hf", "skips_mc", 2, 1, 1, None, None],
    ["experts", "experts_hf", "experts_mc", 1, 1, 2, None, None],
]


def _tool(argv, name="convert_checkpoint"):
    return cli.run(f"{name}.py", load_tool(name).main, argv)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """HF model -> Megatron -> HF export for the skips-only and experts-only models; the JAI model
    (skips + experts) is made by Megatron itself in the torchrun of ``parity``."""
    root = tmp_path_factory.mktemp("export")
    tok = tiny_tokenizer(str(root / "tok"))
    for name, cfg in (("skips", SKIPS), ("experts", EXPERTS)):
        save_hf_model(cfg, root / f"{name}_hf0")
        hf_to_mcore(str(root / f"{name}_hf0"), str(root / f"{name}_mc"), progress=False)
        mcore_to_hf(str(root / f"{name}_mc"), str(root / f"{name}_hf"), progress=False, tokenizer=tok)
    os.makedirs(root / "jai")
    JAI.save(str(root / "jai" / "model_config.json"))
    with open(root / "cases.json", "w") as f:
        json.dump(CASES, f)
    return root, tok


@pytest.fixture(scope="module")
def parity(work):
    root, tok = work
    proc = torchrun(2, PARITY, root, tok, timeout=600)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(CASES), proc.stdout + proc.stderr
    return results


@pytest.mark.dist
def test_logits_match_megatron_at_tp_pp_ep(parity):
    for r in parity:
        assert r["diff"] <= 1e-4, r
        assert r["argmax"] == 1.0 and r["max_logit"] > 1.0, r  # logits large enough to mean something


@pytest.mark.dist
def test_export_layout_config_and_round_trip_are_bit_exact(work, parity, tmp_path):
    """config.json, code, tokenizer and generation config of an export; mcore -> HF -> mcore and
    HF -> mcore -> HF give identical tensors (and the same config.json)."""
    root, tok = work
    files = set(os.listdir(root / "jai_hf"))
    assert {"config.json", "configuration_jai.py", "modeling_jai.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json"} <= files, files
    hf = json.load(open(root / "jai_hf" / "config.json"))
    assert hf["model_type"] == "jai" and hf["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_jai.JaiForCausalLM"
    assert hf["skip_connections"][1] == {"source": 1, "target": 3, "alpha_train": 0.5, "alpha_infer": 0.7}
    assert (hf["num_local_experts"], hf["num_experts_per_tok"], hf["norm_topk_prob"]) == (4, 2, True)
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, 2, 2)
    assert "model.layers.3.block_sparse_moe.experts.3.w2.weight" in safetensors_dict(root / "jai_hf")
    skips = json.load(open(root / "skips_hf" / "config.json"))
    assert skips["rope_parameters"] == {"rope_type": "linear", "rope_theta": 40000.0, "factor": 2.0}
    assert skips["rope_theta"] == 40000.0 and skips["rope_scaling"]["factor"] == 2.0
    assert "model.layers.0.mlp.gate_proj.weight" in safetensors_dict(root / "skips_hf")
    experts = json.load(open(root / "experts_hf" / "config.json"))
    assert (experts["router_expert_bias"], experts["norm_topk_prob"]) == (True, False)
    assert json.load(open(root / "jai_hf" / "generation_config.json")) == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    for name in ("jai", "skips", "experts"):
        mc, hf_dir = root / f"{name}_mc", root / f"{name}_hf"
        hf_to_mcore(str(hf_dir), str(tmp_path / f"{name}_mc2"), progress=False)
        mcore_to_hf(str(tmp_path / f"{name}_mc2"), str(tmp_path / f"{name}_hf2"), progress=False)
        a, b = CheckpointReader(str(mc)), CheckpointReader(str(tmp_path / f"{name}_mc2"))
        assert a.config.replace(name="") == b.config.replace(name=""), name
        keys = [k for k in a.keys() if k.startswith(("embedding", "decoder", "output_layer"))]
        assert keys and set(keys) <= set(b.keys()), name
        vocab = a.config.vocab_size
        for k in keys:
            x, y = a.read(k), b.read(k)
            if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
                # Rows past the vocabulary are Megatron's padding (random after Megatron's own
                # init): not exported, zero after import.
                assert not y[vocab:].any() and x.shape == y.shape, (name, k)
                x, y = x[:vocab], y[:vocab]
            assert torch.equal(x, y), (name, k)
        x, y = safetensors_dict(hf_dir), safetensors_dict(tmp_path / f"{name}_hf2")
        assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x), name
        for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (hf_dir / f).read_bytes() == (tmp_path / f"{name}_hf2" / f).read_bytes(), (name, f)
    x, y = safetensors_dict(root / "skips_hf0"), safetensors_dict(root / "skips_hf")
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_jai_config_round_trips_every_model_config():
    from megatron_jai.checkpoint.formats import ConversionError
    from megatron_jai.checkpoint.formats.jai import hf_config as jai_hf_config_from_model_config
    from megatron_jai.checkpoint.formats.jai import model_config as model_config_from_jai
    from megatron_jai.presets import JAI_75B

    for cfg in (JAI, SKIPS, EXPERTS, JAI_75B,
                JAI_75B.replace(moe_capacity_factor=1.25, tie_embeddings=True, kv_channels=96)):
        hf = jai_hf_config_from_model_config(cfg)
        assert model_config_from_jai(hf, name=cfg.name) == cfg, cfg.name
    with pytest.raises(ConversionError, match="skip_connections must be a list"):
        model_config_from_jai({**hf, "skip_connections": [{"source": 1}]})
    with pytest.raises(ConversionError, match="RoPE type 'yarn'"):
        model_config_from_jai({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_dense_model_in_jai_format_round_trips(work, tmp_path):
    """A dense model without skips exports as Phi-3 by default; --format jai gives the JAI layout,
    which loads with the same logits and reads back bit-exact."""
    from megatron_jai.checkpoint.formats import hf_layout

    root, tok = work
    dense = SKIPS.replace(skip_connections=(), rotary_interpolation_factor=None)
    assert hf_layout(dense) == "phi3" and hf_layout(SKIPS) == "jai"
    assert hf_layout(EXPERTS.replace(moe_expert_bias=False, moe_normalize_topk=True)) == "mixtral"
    assert hf_layout(EXPERTS) == hf_layout(dense.replace(rotary_interpolation_factor=4.0)) == "jai"
    ref = save_hf_model(dense, tmp_path / "hf0").eval()
    hf_to_mcore(str(tmp_path / "hf0"), str(tmp_path / "mc"), progress=False)
    assert _tool(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "hf"),
                  "--tokenizer", tok, "--format", "jai", "--no-progress"]) == 0
    x, y = safetensors_dict(tmp_path / "hf0"), safetensors_dict(tmp_path / "hf")
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    ids = torch.randint(0, dense.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, _load(tmp_path / "hf")(ids).logits)


def test_skip_alphas_follow_train_and_eval(work):
    """model.train() blends with alpha_train, model.eval() with alpha_infer: the same as an eval
    model whose inference alphas are the training ones."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root, _ = work
    model = _load(root / "skips_hf")
    config = AutoConfig.from_pretrained(str(root / "skips_hf"), trust_remote_code=True)
    config.skip_connections = [dict(s, alpha_infer=s["alpha_train"]) for s in config.skip_connections]
    as_train = AutoModelForCausalLM.from_pretrained(str(root / "skips_hf"), config=config,
                                                    trust_remote_code=True,
                                                    attn_implementation="eager").eval()
    ids = torch.randint(0, SKIPS.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        infer = model(ids).logits
        train = model.train()(ids).logits
        again = model.eval()(ids).logits
        assert torch.equal(train, as_train(ids).logits)
    assert torch.equal(infer, again) and (train - infer).abs().max() > 1e-3


@pytest.mark.dist
def test_generate_with_cache_padding_and_sdpa(work, parity):
    """Greedy generate() of the JAI export: with the KV cache = without it, on a left-padded batch
    (attention mask) = the padded prompt alone; SDPA = eager; gradient checkpointing runs."""
    root, _ = work
    model = _load(root / "jai_hf")
    a, b = [5, 9, 14, 20, 7, 33], [12, 40, 3]
    ids = torch.tensor([a, [2] * 3 + b])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=2, eos_token_id=None)
    cached = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **kw))
    alone = model.generate(torch.tensor([b]), **kw)  # the padded prompt
    assert cached[1, -4:].tolist() == alone[0, -4:].tolist()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits[1, 3:]
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[1, 3:], eager,
                                   rtol=1e-5, atol=1e-5)
    model.train()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_tokenizer_travels_with_the_checkpoint(work, tmp_path):
    """A checkpoint whose tokenizer/ holds a bare sentencepiece model (as vocabulary surgery and
    training runs leave it) exports without --tokenizer: AutoTokenizer loads it offline and encodes
    like our tokenizer, the special-token ids are set, generation config and chat template exist."""
    from transformers import AutoTokenizer

    from megatron_jai.data.tokenizer import load_tokenizer

    root, tok = work
    mc = tmp_path / "mc"
    shutil.copytree(root / "experts_mc", mc)
    shutil.rmtree(mc / "hf", ignore_errors=True)  # a checkpoint with no record of an HF original
    os.makedirs(mc / "tokenizer")
    shutil.copy(tok, mc / "tokenizer")  # keeps its own name, tiny_sp.model
    assert _tool(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "hf"),
                  "--no-progress"]) == 0
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    ours = load_tokenizer(tok)
    for text in ("the red cat saw 3 big dogs.", "  Ｔｈｅ  wide   river ", "tab\tand\nnewline", ""):
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 2)
    assert hf_tok.encode("the cat") == ours.encode("the cat")  # no BOS: training data has none
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat.startswith("<s><|user|>\nhi<|end|>\n<|assistant|>")


TOKEN_ATTRIBUTES = ("content", "rstrip", "lstrip", "normalized", "special", "single_word")


def _export_tokenizer(src, out, vocab_size=32064):
    from megatron_jai.hf.tokenizer import export_tokenizer

    os.makedirs(out, exist_ok=True)
    return export_tokenizer(str(src), str(out), vocab_size, 4096)


def _assert_carried(exported, config):
    """Every added token's attributes, the chat template and bos/eos/pad/unk of ``config`` (a
    source's tokenizer_config.json) are the export's, as ``AutoTokenizer`` loads it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exported))
    for sid, token in config["added_tokens_decoder"].items():
        got = tok.added_tokens_decoder[int(sid)]
        assert {k: getattr(got, k) for k in TOKEN_ATTRIBUTES} == \
            {k: token[k] for k in TOKEN_ATTRIBUTES}, sid
    assert tok.chat_template == config["chat_template"]
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        expected = value.get("content") if isinstance(value, dict) else value
        assert getattr(tok, key) == expected, key
    return tok


@pytest.mark.parametrize("base", ["phi3", "english"])
def test_phi3_layout_tokenizer_export(base, shared_dir, tmp_path, tmp_path_factory):
    """The Phi-3 layout (sentencepiece + added_tokens.json + config, no tokenizer.json), Phi-3's
    own and an English BPE of 600 pieces with Phi-3's special tokens at 600-610 and its template
    (train_tokenizer --special-tokens-from phi3): the export encodes like sentencepiece, keeps every
    added-token attribute (rstrip on the chat tokens: no newline token after them), the chat
    template and the special tokens, and stops generation at <|endoftext|> and <|end|>."""
    from megatron_jai.data.tokenizer import load_tokenizer
    from test_tokenizer import make_english_base_tokenizers

    if base == "phi3":
        src, eos, rows = os.path.join(shared_dir, "tokenizers", "phi3"), 32000, 32064
    else:
        src, eos, rows = make_english_base_tokenizers(tmp_path_factory, shared_dir)[0], 600, 640
    info = _export_tokenizer(src, tmp_path, rows)
    assert info.token_ids() == {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": eos}
    assert info.generation_config()["eos_token_id"] == [eos, eos + 7]
    hf_tok = _assert_carried(tmp_path, json.load(open(os.path.join(src, "tokenizer_config.json"))))
    ours = load_tokenizer(src)
    for text in ("Hello world!  Two  spaces\nnew line", "สวัสดีครับ ภาษาไทย 123", "emoji 😀 \t tab"):
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert hf_tok.encode("Hi")[0] == 1 and hf_tok.convert_tokens_to_ids("<|end|>") == eos + 7
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant",
                                                                          "content": "y"}])
    assert hf_tok.convert_ids_to_tokens(chat["input_ids"]) == \
        ["<s>", "<|user|>", "x", "<|end|>", "<|assistant|>", "y", "<|end|>"]
    with pytest.raises(cli.UserError, match=f"{eos + 11} ids but the model only 300"):
        _export_tokenizer(src, tmp_path / "small", 300)


def test_extended_and_configless_tokenizers_export_unchanged(shared_dir, tmp_path,
                                                             tmp_path_factory):
    """An extended tokenizer (tools/extend_tokenizer.py) keeps its attributes, template and special
    tokens; a sentencepiece directory without tokenizer_config.json gets the defaults of its own
    files (added tokens special, nothing stripped), the model's <s>/<unk>, eos = pad = the
    end-of-document token of training, and Phi-3's chat template (said in a note)."""
    from test_tokenizer import make_tiny_thai_tokenizer

    _, ext = make_tiny_thai_tokenizer(tmp_path_factory, shared_dir)
    _export_tokenizer(ext, tmp_path / "ext", 32400)
    _assert_carried(tmp_path / "ext", json.load(open(os.path.join(ext, "tokenizer_config.json"))))

    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in ("tokenizer.model", "added_tokens.json"):
        shutil.copy(os.path.join(shared_dir, "tokenizers", "phi3", name), bare)
    info = _export_tokenizer(bare, tmp_path / "bare_hf")
    assert info.token_ids() == {"bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000}
    defaults = {"rstrip": False, "lstrip": False, "normalized": False, "special": True,
                "single_word": False}
    added = json.load(open(bare / "added_tokens.json"))
    from megatron_jai.data.hf_tokenizer import PHI3_CHAT_TEMPLATE

    _assert_carried(tmp_path / "bare_hf", {
        "added_tokens_decoder": {str(i): {"content": c, **defaults} for c, i in added.items()},
        "chat_template": PHI3_CHAT_TEMPLATE, "bos_token": "<s>", "unk_token": "<unk>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})


def _documents(shared_dir):
    """Every document of the Thai and English valid and test splits (683 and 116)."""
    import gzip

    out = {}
    for lang, name in (("thai", "thaigov_v2"), ("english", "enwiki")):
        out[lang] = []
        for split in ("valid", "test"):
            with gzip.open(os.path.join(shared_dir, "data", lang, f"{name}.{split}.jsonl.gz"),
                           "rt", encoding="utf-8") as f:
                out[lang] += [json.loads(line)["text"] for line in f]
    return out


def test_exports_encode_documents_as_training_did(shared_dir, tmp_path, tmp_path_factory):
    """``AutoTokenizer(export).encode`` equals the training tokenizer on every document of the Thai
    and English valid and test splits, for Phi-3's layout (sentencepiece) and an extended
    tokenizer."""
    from transformers import AutoTokenizer

    from megatron_jai.data.tokenizer import load_tokenizer
    from test_tokenizer import make_tiny_thai_tokenizer

    _, ext = make_tiny_thai_tokenizer(tmp_path_factory, shared_dir)
    docs = _documents(shared_dir)
    for name, src in (("phi3", os.path.join(shared_dir, "tokenizers", "phi3")), ("ext", ext)):
        _export_tokenizer(src, tmp_path / name, 32400)
        exported = AutoTokenizer.from_pretrained(str(tmp_path / name))
        ours = load_tokenizer(src)
        for lang, texts in docs.items():
            mine = ours.encode_batch(texts)
            theirs = exported(texts, add_special_tokens=False)["input_ids"]
            same = sum(a == b for a, b in zip(mine, theirs))
            assert same == len(texts), (name, lang, same, len(texts))


def test_unigram_sentencepiece_exports_exactly(shared_dir, tmp_path):
    """A unigram sentencepiece model (not only BPE) gets an exact Hugging Face form: every Thai and
    English test-split line encodes to the same ids; a model type without one is refused."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from transformers import AutoTokenizer

    from megatron_jai.data.tokenizer import load_tokenizer
    from train_helpers import small_corpus

    model = small_corpus(shared_dir)["tokenizer"]
    _export_tokenizer(model, tmp_path / "uni", 1024)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "uni"))
    ours = load_tokenizer(model)
    docs = _documents(shared_dir)
    lines = [line for texts in docs.values() for doc in texts[-20:] for line in doc.split("\n")]
    assert len(lines) > 500
    assert ours.encode_batch(lines) == exported(lines, add_special_tokens=False)["input_ids"]

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(open(model, "rb").read())
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.CHAR
    (tmp_path / "char.model").write_bytes(proto.SerializeToString())
    with pytest.raises(cli.UserError, match="CHAR model has no exact Hugging Face form"):
        _export_tokenizer(str(tmp_path / "char.model"), tmp_path / "char", 1024)


def test_every_chat_record_tokenizes_as_training_did(shared_dir, tmp_path):
    """For every record of every chat file in shared/data/post (the records preprocess_chat
    accepts; none truncated), the Phi-3 export's ``apply_chat_template(messages)`` ids equal the ids
    ``preprocess_chat`` wrote for training (SFT: the conversation; DPO: prompt + chosen and prompt +
    rejected)."""
    import gzip

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from megatron_jai.data import chat as C

    phi3 = os.path.join(shared_dir, "tokenizers", "phi3")
    _export_tokenizer(phi3, tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    post = os.path.join(shared_dir, "data", "post")
    files = sorted(f for f in os.listdir(post) if f.endswith(".jsonl.gz"))
    assert len(files) >= 7
    for name in files:
        kind = "dpo" if "_dpo_" in name else "sft"
        prefix = str(tmp_path / name)
        stats = C.preprocess_chat(kind, [os.path.join(post, name)], prefix, phi3,
                                  seq_length=16384, max_bad_fraction=0.01, progress=False)
        assert stats.truncated == stats.skipped_too_long == 0
        conversations = []
        with gzip.open(os.path.join(post, name), "rb") as f:
            for line in f:
                try:
                    if kind == "sft":
                        conversations.append(C.parse_sft(C._load_record(line)))
                    else:
                        prompt, chosen, rejected = C.parse_dpo(C._load_record(line))
                        conversations += [prompt + chosen, prompt + rejected]
                except C.BadRecord:  # counted and skipped by preprocess_chat too
                    pass
        written = IndexedDataset(prefix)
        assert len(written) == len(conversations) == stats.sequences, name
        ids = exported.apply_chat_template(conversations, tokenize=True, return_dict=False)
        same = sum(written[i].tolist() == ids[i] for i in range(len(ids)))
        assert same == len(ids), (name, same, len(ids))


def test_bad_input_one_line_no_output(work, tmp_path, capsys):
    root, tok = work
    mc = tmp_path / "mc"
    shutil.copytree(root / "skips_mc", mc)
    shutil.rmtree(mc / "hf", ignore_errors=True)
    out = tmp_path / "out"
    cases = [
        (["--mcore-dir", str(mc)], "carries no tokenizer; pass the one the model was trained with: "
                                   "--tokenizer PATH"),
        (["--mcore-dir", str(root / "skips_hf")], "is not a checkpoint"),
        (["--mcore-dir", str(mc), "--tokenizer", str(tmp_path / "nope")], "does not exist"),
        (["--mcore-dir", str(mc), "--tokenizer", str(mc)], "holds no loadable tokenizer"),
    ]
    for args, message in cases:
        assert _tool(["mcore-to-hf", "--out", str(out), "--no-progress", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convert_checkpoint.py: error:"), lines
        assert message in lines[0], lines
        assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["mc"]
    # compare_logits checks before any process group starts
    for args, message in (
            (["--hf-dir", str(root / "skips_hf"), "--mcore-dir", str(root / "experts_mc")],
             "are different models (HF vs Megatron: num_experts 0 vs 4"),
            (["--hf-dir", str(root / "skips_hf"), "--mcore-dir", str(mc), "--pp", "2",
              "--first-stage-layers", "4"], "first pipeline stage must be between 1 and 3")):
        assert _tool(args, "compare_logits") == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("compare_logits.py: error:") and message in lines[0], lines
