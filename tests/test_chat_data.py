"""Chat data (megatron_jai.data.chat, tools/preprocess_chat.py): rendering with the tokenizer's chat
template, assistant loss masks, truncation, bad records, the SFT/DPO layouts and the readers."""
import gzip
import json
import os
import runpy
import sys

import numpy
import pytest

from conftest import REPO_ROOT, run_cmd
from megatron_jai import cli
from megatron_jai.data import chat as C

TOOL = os.path.join(REPO_ROOT, "tools", "preprocess_chat.py")

SFT_RECORDS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a colour.\nJust one."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "สวัสดีครับ"},
     {"role": "assistant", "content": "สวัสดีครับ ยินดีที่ได้รู้จัก\nมีอะไรให้ช่วยไหม"}],
    [{"role": "user", "content": "List three primes."},
     {"role": "assistant", "content": "2, 3 and 5."},
     {"role": "user", "content": "And the next one?"},
     {"role": "assistant", "content": "7 (then 11, 13)."},
     {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "You are welcome!"}],
]

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + "
        "m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + "
        "' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def phi3(shared_dir):
    return os.path.join(shared_dir, "tokenizers", "phi3")


@pytest.fixture(scope="module")
def chat(phi3):
    return C.load_chat_tokenizer(phi3)


def _masked_runs(chat, ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    return [chat.hf.decode(r) for r in runs + ([cur] if cur else [])]


def _assistant_turns(messages, closing):
    return [m["content"] + closing for m in messages if m["role"] == "assistant"]


def test_phi3_rendering_equals_apply_chat_template_and_masks_assistant_turns(chat, phi3):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(phi3, local_files_only=True)
    assert chat.ignores_system  # Phi-3's template drops system messages
    for messages in SFT_RECORDS:
        ids, mask = chat.render(messages)
        assert ids.tolist() == reference.apply_chat_template(messages, tokenize=True,
                                                             return_dict=False)
        assert ids[0] == reference.bos_token_id and (ids == reference.bos_token_id).sum() == 1
        # every assistant turn, and only those, each with the token that closes it
        assert _masked_runs(chat, ids, mask) == _assistant_turns(messages, "<|end|>")
        end, header = reference.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
        assert mask[ids == header].sum() == 0 and ids[-1] == end and mask[-1] == 1
    # train_from: only the turns after the prompt (DPO)
    ids, mask = chat.render(SFT_RECORDS[2], train_from=5)
    assert _masked_runs(chat, ids, mask) == ["You are welcome!<|end|>"]


def test_other_base_rendering(tmp_path_factory, shared_dir):
    """The extended tokenizer of a base other than Phi-3's (an English BPE of its own with Phi-3's
    special tokens and template, grown to 1,200 ids): apply_chat_template's ids, the assistant
    turns and their <|end|> trained, the headers not."""
    from transformers import AutoTokenizer

    from test_tokenizer import make_english_base_tokenizers

    _, ext = make_english_base_tokenizers(tmp_path_factory, shared_dir)
    chat, reference = C.load_chat_tokenizer(ext), AutoTokenizer.from_pretrained(ext)
    end, header = reference.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    assert (end, header) == (607, 601)
    for messages in SFT_RECORDS:
        ids, mask = chat.render(messages)
        assert ids.tolist() == reference.apply_chat_template(messages, tokenize=True,
                                                             return_dict=False)
        assert _masked_runs(chat, ids, mask) == _assistant_turns(messages, "<|end|>")
        assert mask[ids == header].sum() == 0 and ids[mask == 1][-1] == end


def _tiny_tokenizer_dir(path, template):
    """A byte-level BPE tokenizer (no BOS) with ChatML specials and the given chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(["What is the answer? The answer is 42.\nThanks, you are welcome!",
                             "system user assistant [INST] [/INST] 2, 3 and 5. 7"] * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>",
                                 pad_token="<|endoftext|>")
    hf.chat_template = template
    hf.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("template,closing,leading", [(CHATML, "<|im_end|>", ""),
                                                     (INST, " <|endoftext|>", " ")])
def test_other_templates(tmp_path, template, closing, leading):
    from transformers import AutoTokenizer

    path = _tiny_tokenizer_dir(tmp_path / "tok", template)
    chat, reference = C.ChatTokenizer(path), AutoTokenizer.from_pretrained(path, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, *SFT_RECORDS[2][:4]]
    ids, mask = chat.render(messages)
    assert ids.tolist() == reference.apply_chat_template(messages, tokenize=True, return_dict=False)
    # ChatML: the closing <|im_end|> is trained, the newline after it and the next header are not;
    # [INST]: the token " 2" straddling the turn's start (template space + content) is trained
    assert _masked_runs(chat, ids, mask) == [leading + t for t in
                                             _assistant_turns(messages, closing)]
    if leading:
        assert " 2" in reference.convert_ids_to_tokens(ids.tolist()) or \
            "\u01202" in reference.convert_ids_to_tokens(ids.tolist())
    assert chat.ignores_system == (template is INST)


def test_truncation_keeps_final_assistant_turn(chat):
    system = {"role": "system", "content": "Answer briefly."}
    conv = [system] + SFT_RECORDS[2]
    full, _ = chat.render(conv)
    final_round = [system] + SFT_RECORDS[2][4:]
    last2 = [system] + SFT_RECORDS[2][2:]
    n_last2, n_final = len(chat.render(last2)[0]), len(chat.render(final_round)[0])
    assert n_final < n_last2 < len(full)

    seqs, status = C.fit_record(chat, conv, [[]], len(full))
    assert status == "ok" and seqs[0][0].tolist() == full.tolist()
    # the oldest round goes first, system kept; every remaining assistant turn is trained
    seqs, status = C.fit_record(chat, conv, [[]], n_last2)
    assert status == "truncated" and seqs[0][0].tolist() == chat.render(last2)[0].tolist()
    assert len(_masked_runs(chat, *seqs[0])) == 2
    seqs, status = C.fit_record(chat, conv, [[]], n_last2 - 1)
    assert status == "truncated" and seqs[0][0].tolist() == chat.render(final_round)[0].tolist()
    assert _masked_runs(chat, *seqs[0]) == ["You are welcome!<|end|>"]
    assert C.fit_record(chat, conv, [[]], n_last2, too_long="skip") == (None, "skipped")
    # the final round does not fit: its answer is cut; no room for any answer token: bad record
    ids_final, mask_final = chat.render(final_round)
    prompt = int(numpy.flatnonzero(mask_final)[0])
    seqs, status = C.fit_record(chat, conv, [[]], prompt + 2)
    assert status == "truncated" and seqs[0][0].tolist() == ids_final[:prompt + 2].tolist()
    assert seqs[0][1].tolist() == [0] * prompt + [1, 1]
    for too_long in ("truncate", "skip"):
        with pytest.raises(C.BadRecord, match="prompt_too_long"):
            C.fit_record(chat, conv, [[]], prompt, too_long=too_long)


def test_keep_start_is_trls_truncation(tmp_path, chat):
    # The whole conversation, its first N tokens: the oldest rounds stay, the latest lose their tail.
    conv = SFT_RECORDS[2]
    full, full_mask = chat.render(conv)
    n = len(full) - 5
    seqs, status = C.fit_record(chat, conv, [[]], n, too_long="keep_start")
    assert status == "truncated"
    assert seqs[0][0].tolist() == full[:n].tolist() and seqs[0][1].tolist() == full_mask[:n].tolist()
    assert _masked_runs(chat, *seqs[0])[0] == "2, 3 and 5.<|end|>"
    # DPO through preprocessing: prompt + answer cut at N; no answer token left: prompt_too_long
    records = _dpo_lines()
    ids, mask = chat.render(records[1]["prompt"] + [{"role": "assistant", "content": "11."}], 3)
    answer_start = int(numpy.flatnonzero(mask)[0])
    prefix = str(tmp_path / "dpo")
    stats = C.preprocess_chat("dpo", [_write_jsonl(tmp_path / "dpo.jsonl.gz", records)], prefix,
                              chat.path, seq_length=answer_start + 1, too_long="keep_start",
                              progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, written_mask = IndexedDataset(prefix), IndexedDataset(C.mask_prefix(prefix))
    assert (stats.records, stats.truncated) == (4, 1)  # the others are shorter
    assert tokens[2].tolist() == ids[:answer_start + 1].tolist()
    assert written_mask[2].tolist() == [0] * answer_start + [1]
    with pytest.raises(C.BadRecord, match="prompt_too_long"):
        C.encode_record(chat, "dpo", records[1], answer_start, too_long="keep_start")


def _write_jsonl(path, records):
    with gzip.open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
            f.write(b"\n")
    return str(path)


def _sft_lines(n):
    return [{"messages": SFT_RECORDS[i % len(SFT_RECORDS)]} for i in range(n)]


def _dpo_lines():
    q = [{"role": "user", "content": "Is the sky blue?"}]
    return [
        {"prompt": q, "chosen": "Yes, on a clear day.", "rejected": "No."},
        {"prompt": SFT_RECORDS[2][:3], "chosen": "11.", "rejected": "9 is prime."},
        {"prompt": q, "chosen": [{"role": "assistant", "content": "Usually."}],
         "rejected": [{"role": "assistant", "content": "Never."}]},
        {"chosen": q + [{"role": "assistant", "content": "Mostly yes."}],  # implicit prompt
         "rejected": q + [{"role": "assistant", "content": "It is green."}]},
    ]


BAD_SFT = [
    (b'{"messages": [{"role": "user", "content": "unterminated', "not_json"),
    (b"", "empty"),
    (json.dumps({"text": "no messages"}).encode(), "missing_field"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "bad_message"),
    (json.dumps({"messages": [{"role": "human", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]}).encode(), "unknown_role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "no_assistant"),
    (json.dumps({"messages": [{"role": "user", "content": "long " * 200},
                              {"role": "assistant", "content": "ok"}]}).encode(), "prompt_too_long"),
]
BAD_DPO = [
    (b"{not json}", "not_json"),
    (json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}).encode(), "empty_answer"),
    (json.dumps({"prompt": "q", "chosen": "a", "rejected": "  "}).encode(), "empty_answer"),
    (json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}).encode(),
     "chosen_equals_rejected"),
    (json.dumps({"prompt": [{"role": "tool", "content": "x"}], "chosen": "a",
                 "rejected": "b"}).encode(), "unknown_role"),
    (json.dumps({"prompt": "q", "chosen": "a"}).encode(), "missing_field"),
    (json.dumps({"prompt": "long " * 200, "chosen": "a", "rejected": "b"}).encode(),
     "prompt_too_long"),
]


def _interleave(good, bad):
    lines, expected = [], []
    for i, g in enumerate(good):
        lines.append(g)
        if i < len(bad):
            lines.append(bad[i][0])
            expected.append((len(lines), bad[i][1]))
    return lines, expected


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bad_records_counted_then_refused(tmp_path, phi3, capsys, kind):
    good, bad = (_sft_lines(9), BAD_SFT) if kind == "sft" else (_dpo_lines() * 2, BAD_DPO)
    lines, expected = _interleave(good, bad)
    src = _write_jsonl(tmp_path / f"{kind}.jsonl.gz", lines)
    tool = runpy.run_path(TOOL, run_name="preprocess_chat")  # in-process: no second interpreter
    argv = ["--kind", kind, "--input", src, "--tokenizer", phi3, "--seq-length", "128",
            "--workers", "1", "--no-progress"]

    # over the default --max-bad-fraction: exit 2, one line, nothing written
    out = tmp_path / "out" / kind
    assert cli.run("preprocess_chat.py", tool["main"], argv + ["--output-prefix", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preprocess_chat.py: error: ") and "max-bad-fraction" in err[-1]
    assert f"{len(bad)} of {len(lines)} lines" in err[-1]
    assert not out.parent.exists() or os.listdir(out.parent) == []

    # allowed: each bad record is reported with file:line and counted by reason
    stats = C.preprocess_chat(kind, [src], str(out), phi3, seq_length=128, max_bad_fraction=1.0,
                              progress=False, log=print)
    printed = capsys.readouterr().out
    for line_no, reason in expected:
        assert f"{src}:{line_no}: {reason}" in printed
    counts = {r: n for r, n in stats.bad_lines.items() if n}
    assert counts == {r: [b[1] for b in bad].count(r) for r in {b[1] for b in bad}}
    assert stats.records == len(good) and stats.lines == len(lines)
    assert C.read_chat_meta(str(out), kind)["bad_lines"] == stats.bad_lines


def test_user_errors_exit_2_and_write_nothing(tmp_path, phi3, capsys):
    tool = runpy.run_path(TOOL, run_name="preprocess_chat")
    src = _write_jsonl(tmp_path / "sft.jsonl.gz", _sft_lines(3))
    base = ["--kind", "sft", "--workers", "1", "--no-progress", "--seq-length", "256"]
    prefix = str(tmp_path / "o" / "sft")
    full = open(_write_jsonl(tmp_path / "full.jsonl.gz", _sft_lines(2000)), "rb").read()
    (tmp_path / "cut.jsonl.gz").write_bytes(full[:len(full) // 2])
    cases = [
        (["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", phi3], "does not exist"),
        (["--input", src, "--tokenizer", str(tmp_path / "no_tokenizer")], "not a directory"),
        (["--input", src, "--tokenizer", str(tmp_path)], "cannot load the tokenizer"),
        (["--input", str(tmp_path / "cut.jsonl.gz"), "--tokenizer", phi3], "truncated or corrupt"),
    ]
    for args, message in cases:
        assert cli.run("preprocess_chat.py", tool["main"],
                       base + args + ["--output-prefix", prefix]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not os.path.exists(os.path.dirname(prefix)) or not os.listdir(os.path.dirname(prefix))
    # an existing dataset is not replaced without --force, and stays intact
    C.preprocess_chat("sft", [src], prefix, phi3, seq_length=256, progress=False)
    before = {f: (tmp_path / "o" / f).read_bytes() for f in os.listdir(tmp_path / "o")}
    assert cli.run("preprocess_chat.py", tool["main"],
                   base + ["--input", src, "--tokenizer", phi3, "--output-prefix", prefix]) == 2
    assert "exists (use --force" in capsys.readouterr().err
    assert {f: (tmp_path / "o" / f).read_bytes() for f in os.listdir(tmp_path / "o")} == before


def _sft_dataset(tmp_path, chat, name, records, seq_length=128):
    src = _write_jsonl(tmp_path / f"{name}.jsonl.gz", [{"messages": m} for m in records])
    prefix = str(tmp_path / name)
    C.preprocess_chat("sft", [src], prefix, chat.path, seq_length=seq_length, progress=False)
    return prefix


def test_sft_layout_and_reader(tmp_path, chat):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = _sft_dataset(tmp_path, chat, "sft", SFT_RECORDS)
    tokens, mask = IndexedDataset(prefix), IndexedDataset(C.mask_prefix(prefix))
    assert len(tokens) == len(mask) == len(SFT_RECORDS)
    for i, messages in enumerate(SFT_RECORDS):
        ids, m = chat.render(messages)
        assert tokens[i].tolist() == ids.tolist() and mask[i].tolist() == m.tolist()
    meta = C.read_chat_meta(prefix, "sft")
    assert (meta["records"], meta["vocab_size"], meta["eod"], meta["pad_id"]) == \
        (3, len(chat.hf), chat.eod, chat.pad_id)
    assert meta["loss_tokens"] == sum(int(mask[i].sum()) for i in range(3))
    assert meta["fingerprint"] == C.dataset_fingerprint(prefix)
    with pytest.raises(C.ChatDataError, match="is a sft dataset, not dpo"):
        C.build_chat_dataset("dpo", prefix, 128)
    with pytest.raises(C.ChatDataError, match="longer than seq_length 16"):
        C.build_chat_dataset("sft", prefix, 16)

    # validation: every record once, in order; labels/loss_mask aligned with the next token
    S = 96
    valid = C.build_chat_dataset("sft", prefix, S)
    assert len(valid) == 3
    for i, messages in enumerate(SFT_RECORDS):
        item = valid[i]
        ids, m = chat.render(messages)
        n = len(ids)
        assert item["tokens"][:n].tolist() == ids.tolist()
        assert (item["tokens"][n:] == chat.pad_id).all() and item["loss_mask"][n - 1:].sum() == 0
        assert item["labels"][:n - 1].tolist() == ids[1:].tolist()
        assert item["loss_mask"][:n - 1].tolist() == m[1:].tolist()
        assert item["position_ids"].tolist() == list(range(S))
        trained = item["labels"][item["loss_mask"] > 0]
        assert chat.hf.decode(trained) == "".join(_assistant_turns(messages, "<|end|>"))
        assert item["tokens"].dtype == item["labels"].dtype == item["position_ids"].dtype
        assert str(item["loss_mask"].dtype) == "torch.float32" and item["dataset_id"] == 0

    # training: epochs wrap with a new seeded order, deterministic per (seed, index)
    train = C.build_chat_dataset("sft", prefix, S, num_samples=12, seed=5)
    again = C.build_chat_dataset("sft", prefix, S, num_samples=30, seed=5)
    orders = [[train.records(i)[1][0] for i in range(e * 3, e * 3 + 3)] for e in range(4)]
    assert all(sorted(o) == [0, 1, 2] for o in orders) and len({tuple(o) for o in orders}) > 1
    for i in range(12):
        assert train.records(i) == again.records(i)
        assert train[i]["tokens"].tolist() == again[i]["tokens"].tolist()
    other = C.build_chat_dataset("sft", prefix, S, num_samples=12, seed=6)
    assert [other.records(i) for i in range(12)] != [train.records(i) for i in range(12)]


def test_blend_proportions_and_packing(tmp_path, chat):
    a = _sft_dataset(tmp_path, chat, "a", SFT_RECORDS[:2])
    b = _sft_dataset(tmp_path, chat, "b", SFT_RECORDS[1:] * 2)
    ds = C.build_chat_dataset("sft", [(3, a), (1, b)], 96, num_samples=100, seed=1)
    ids = [ds[i]["dataset_id"] for i in range(100)]
    assert ids.count(0) == 75 and ids.count(1) == 25
    assert ds[7]["tokens"].tolist() == C.build_chat_dataset(
        "sft", [(3, a), (1, b)], 96, num_samples=8, seed=1)[7]["tokens"].tolist()
    valid = C.build_chat_dataset("sft", [(3, a), (1, b)], 96)
    assert [valid.records(i) for i in range(len(valid))] == \
        [(0, [0]), (0, [1]), (1, [0]), (1, [1]), (1, [2]), (1, [3])]

    # packing: next-fit groups; per-conversation positions and labels, nothing across the seams
    assert C.pack_greedy([3, 4, 2, 5, 1], 7) == [0, 2, 4, 5]
    assert C.pack_greedy([3, 4, 2, 5, 1], 7, max_packs=2) == [0, 2, 4]
    with pytest.raises(C.ChatDataError):
        C.pack_greedy([3, 9], 7)
    with pytest.raises(C.ChatDataError, match="SFT only"):
        C.build_chat_dataset("dpo", a, 96, pack=True)
    S = 160
    packed = C.build_chat_dataset("sft", b, S, num_samples=5, seed=3, pack=True)
    seen = []
    for i in range(5):
        item, (_, records) = packed[i], packed.records(i)
        seqs = [chat.render(SFT_RECORDS[1:][r % 2]) for r in records]
        lengths = [len(s[0]) for s in seqs]
        assert sum(lengths) <= S
        bounds = numpy.cumsum([0] + lengths).tolist() + ([S] if sum(lengths) < S else [])
        assert item["cu_seqlens"].tolist() == bounds and str(item["cu_seqlens"].dtype) == "torch.int32"
        assert item["max_seqlen"] == max(numpy.diff(bounds))
        for (ids, m), start in zip(seqs, bounds):
            n = len(ids)
            assert item["tokens"][start:start + n].tolist() == ids.tolist()
            assert item["position_ids"][start:start + n].tolist() == list(range(n))
            assert item["labels"][start:start + n - 1].tolist() == ids[1:].tolist()
            assert item["loss_mask"][start:start + n - 1].tolist() == m[1:].tolist()
            assert item["loss_mask"][start + n - 1] == 0  # the last token predicts nothing
        seen += records
    # the stream is the shuffled epochs, in order: packs take consecutive records of it
    assert sorted(seen[:4]) == [0, 1, 2, 3] and sorted(seen[4:8]) == [0, 1, 2, 3]
    assert sum(C.build_chat_dataset("sft", b, S, pack=True)[0]["loss_mask"]) > 0


def test_dpo_layout_and_reader(tmp_path, chat):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    records = _dpo_lines()
    src = _write_jsonl(tmp_path / "dpo.jsonl.gz", records)
    prefix = str(tmp_path / "dpo")
    stats = C.preprocess_chat("dpo", [src], prefix, chat.path, seq_length=128, progress=False)
    assert (stats.records, stats.sequences) == (4, 8)
    tokens, mask = IndexedDataset(prefix), IndexedDataset(C.mask_prefix(prefix))
    assert tokens.document_indices.tolist() == [0, 2, 4, 6, 8]
    answers = [("Yes, on a clear day.", "No."), ("11.", "9 is prime."), ("Usually.", "Never."),
               ("Mostly yes.", "It is green.")]
    for i, pair in enumerate(answers):
        for j, answer in enumerate(pair):
            ids = tokens[2 * i + j]
            assert _masked_runs(chat, ids, mask[2 * i + j]) == [answer + "<|end|>"]
        n_prompt = int(numpy.flatnonzero(mask[2 * i])[0])
        assert tokens[2 * i][:n_prompt].tolist() == tokens[2 * i + 1][:n_prompt].tolist()
    first = chat.render(records[1]["prompt"] + [{"role": "assistant", "content": "11."}], 3)
    assert tokens[2].tolist() == first[0].tolist()

    S = 64
    train = C.build_chat_dataset("dpo", [(1.0, prefix)], S, num_samples=6, seed=2)
    for i in range(6):
        item = train[i]
        r = item["record_index"]
        assert train.records(i) == (0, [r]) and item["dataset_id"] == 0
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert tuple(item[key].shape) == (2, S), key
        for row in range(2):
            trained = item["labels"][row][item["loss_mask"][row] > 0]
            assert chat.hf.decode(trained) == answers[r][row] + "<|end|>"


@pytest.mark.dist
def test_cli_with_workers_matches_in_process(tmp_path, phi3):
    src = _write_jsonl(tmp_path / "sft.jsonl.gz", _sft_lines(300))  # two chunks of 256 lines
    out = run_cmd([sys.executable, TOOL, "--kind", "sft", "--input", src, "--output-prefix",
                   str(tmp_path / "w2"), "--tokenizer", phi3, "--seq-length", "128", "--workers",
                   "2", "--no-progress"])
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("preprocess_chat: sft 300 conversations (300 sequences)"), summary
    assert "bad 0 of 300 lines (none)" in summary
    assert "ignores system messages; 100 records had one" in out.stderr
    C.preprocess_chat("sft", [src], str(tmp_path / "w1"), phi3, seq_length=128, progress=False,
                      log=lambda m: None)
    assert C.dataset_fingerprint(str(tmp_path / "w1")) == C.dataset_fingerprint(str(tmp_path / "w2"))
