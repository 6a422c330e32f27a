"""Our log-probs are the exported model's (issue 15).

Megatron's vocabulary padding takes no part: the output layer's rows at or above the model's
``vocab_size`` (which the export drops) are masked out of every softmax, so our per-token log-probs,
the training loss (pretraining cross entropy and SFT alike: one output layer) and DPO log-probs are
the export's, and the padding rows never move. On the export, TRL computes the same per-pair DPO
policy log-probs as our DPO pass, on the same ids and completion masks.
"""
import gzip
import json
import os

import pytest
import torch

from conftest import REPO_ROOT, run_python, torchrun
from eval_helpers import JAI, export_hf, make_checkpoint, make_tokenizer
from megatron_jai.config import SkipConnection

POSTTRAIN = os.path.join(REPO_ROOT, "posttrain_jai.py")
SFT_RECORDS = 12  # one global batch holds every record once: the first loss is over all of them
DPO_SEQ = 192  # about a third of the 40 pairs fit whole


def test_mask_vocab_padding_values_and_gradients():
    """Against the plain-torch reference (``masked_fill`` of the ids >= vocab_size) on random
    shapes, shards (``first_id``) and dtypes: the logits, and the gradient through a softmax."""
    from megatron_jai.model.output_layer import mask_vocab_padding

    gen = torch.Generator().manual_seed(0)
    for trial in range(12):
        shard = int(torch.randint(1, 40, (1,), generator=gen))
        first_id = shard * int(torch.randint(0, 4, (1,), generator=gen))
        vocab = int(torch.randint(1, 4 * shard + 1, (1,), generator=gen))
        dtype = (torch.float32, torch.float64, torch.bfloat16)[trial % 3]
        shape = (int(torch.randint(1, 4, (1,), generator=gen)), 5, shard)
        logits = torch.randn(shape, generator=gen).to(dtype)
        weights = torch.randn(shape, generator=gen)
        padding = torch.arange(first_id, first_id + shard) >= vocab

        def run(mask):
            x = logits.clone().requires_grad_()
            out = mask(x * 1)  # (in place on a non-leaf, as on the output layer's result)
            loss = (torch.softmax(out.float(), -1) * weights).sum()
            return out.detach(), torch.autograd.grad(loss, x)[0]

        mine, grad = run(lambda x: mask_vocab_padding(x, vocab, first_id))
        ref, ref_grad = run(lambda x: x.masked_fill(padding, torch.finfo(dtype).min))
        assert torch.equal(mine, ref) and torch.equal(grad, ref_grad), (vocab, first_id, shard)
        assert not grad[..., padding].any()  # padding gets no gradient


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_dir):
    """A JAI-shaped checkpoint (skips + experts, vocabulary 300 padded to 384) and one with Phi-3's
    vocabulary (32,064 ids padded to 32,128, a skip) and tokenizer, each with its HF export; chat
    data for the latter: the first records of the Thai and English SFT and DPO sets."""
    from megatron_jai import parallel
    from megatron_jai.data.chat import preprocess_chat

    root = tmp_path_factory.mktemp("vocab_padding")
    parallel.initialize(1, 1, seed=5)
    tok = make_tokenizer(shared_dir, str(root / "tok"))
    phi3 = os.path.join(shared_dir, "tokenizers", "phi3")
    chat_cfg = JAI.replace(name="tiny-phi3-vocab", vocab_size=32064, num_experts=0, moe_top_k=0,
                           skip_connections=(SkipConnection(0, 2, 0.9, 0.7),))
    out = {"root": root, "jai": make_checkpoint(str(root / "jai"), JAI, tok, seed=1),
           "chat": make_checkpoint(str(root / "chat"), chat_cfg, phi3, seed=2)}
    parallel.destroy()
    export_hf(out["jai"], str(root / "jai_hf"), tok)
    export_hf(out["chat"], str(root / "chat_hf"), phi3)
    for kind, sources, seq_length in (
            ("sft", {"th_sft_wangchanglm_oasst1": SFT_RECORDS // 2,
                     "en_sft_dolly_open_qa": SFT_RECORDS // 2}, 256),
            ("dpo", {"th_dpo_wangchanglm_crowd": 24, "en_dpo_hh_rlhf_harmless_test": 16}, DPO_SEQ)):
        with open(root / f"{kind}.jsonl", "w", encoding="utf-8") as f:
            for name, n in sources.items():
                with gzip.open(os.path.join(shared_dir, "data", "post", f"{name}.jsonl.gz"),
                               "rt", encoding="utf-8") as g:
                    f.writelines(line for _, line in zip(range(n), g))
        preprocess_chat(kind, [str(root / f"{kind}.jsonl")], str(root / kind), phi3,
                        seq_length=seq_length, progress=False)
    return out


def _hf_model(path, train=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                 dtype=torch.float32, attn_implementation="eager")
    return model.train(train)


def _hf_token_logps(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_log_probs_per_token_equal_the_export(models):
    """fp32, on the same random ids: Megatron's per-token log-probs (the training forward's cross
    entropy, eval mode) equal the HF export's within 1e-5, although the padding rows hold random
    weights that, softmaxed along, would move every log-prob."""
    from megatron_jai import parallel
    from megatron_jai.checkpoint.dist import load_checkpoint
    from megatron_jai.model import build_model

    parallel.initialize(1, 1, seed=5)
    try:
        model = build_model(JAI)
        load_checkpoint(models["jai"], [model])
        model.eval()
        padding_rows = model.output_layer.weight[JAI.vocab_size:]
        assert padding_rows.shape[0] == 84 and padding_rows.abs().min() > 0
        ids = torch.randint(0, JAI.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(39).expand(3, 39)
        with torch.no_grad():
            ours = -model(ids[:, :-1], positions, None, labels=ids[:, 1:])
    finally:
        parallel.destroy()
    theirs = _hf_token_logps(_hf_model(models["root"] / "jai_hf"), ids)
    assert (ours - theirs).abs().max() < 1e-5, float((ours - theirs).abs().max())


def _output_rows(root):
    from megatron_jai.checkpoint.dist import latest_iteration
    from megatron_jai.checkpoint.stream import CheckpointReader

    reader = CheckpointReader(os.path.join(root, f"iter_{latest_iteration(root):07d}"))
    return reader.read("output_layer.weight"), reader.read("embedding.word_embeddings.weight")


@pytest.mark.dist
def test_first_sft_loss_is_the_exports_and_padding_rows_never_move(models, tmp_path):
    """SFT through posttrain_jai.py at TP=1 and TP=2 (the second TP shard holds the 64 padding
    rows): the first step's loss equals the HF export's mean NLL over the assistant tokens of the
    same global batch (every record once), and with weight decay 0 the padding rows of the
    output layer (and of the embedding) are bit-identical after training while the real rows
    move."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_jai.data.chat import mask_prefix

    root = models["root"]
    sft = ["sft", "--init-from", models["chat"], "--data-path", root / "sft", "--seq-length", 256,
           "--global-batch-size", SFT_RECORDS, "--micro-batch-size", 3, "--train-iters", 2,
           "--lr", 1e-2, "--warmup-iters", 0, "--weight-decay", 0, "--log-interval", 1,
           "--data-cache-dir", tmp_path / "cache"]
    run_python(POSTTRAIN, *sft, "--save", tmp_path / "tp1",
               "--metrics-file", tmp_path / "tp1.jsonl")
    torchrun(2, POSTTRAIN, *sft, "--tp", 2, "--save", tmp_path / "tp2",
             "--metrics-file", tmp_path / "tp2.jsonl")

    model = _hf_model(root / "chat_hf", train=True)  # training forward: the skip's train alpha
    prefix = str(root / "sft")
    tokens, masks = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    total = count = 0.0
    for i in range(len(tokens)):
        ids = torch.as_tensor(tokens[i].astype("int64"))[None]
        mask = torch.as_tensor(masks[i][1:].astype("float64"))
        total -= float((_hf_token_logps(model, ids)[0].double() * mask).sum())
        count += float(mask.sum())
    assert len(tokens) == SFT_RECORDS and count > 0
    init_out, init_emb = _output_rows(models["chat"])
    vocab = init_out.shape[0] - 64
    for run in ("tp1", "tp2"):
        with open(tmp_path / f"{run}.jsonl") as f:
            first = json.loads(f.readline())["loss"]
        assert abs(first - total / count) < 1e-5, (run, first, total / count)
        out, emb = _output_rows(tmp_path / run)
        assert torch.equal(out[vocab:], init_out[vocab:])
        assert torch.equal(emb[vocab:], init_emb[vocab:])
        assert not torch.equal(out[:vocab], init_out[:vocab])


@pytest.mark.dist
def test_dpo_policy_log_probs_equal_trl(models, tmp_path):
    """Our DPO pass (``posttrain_jai.py dpo-reference``: the policy's training forward over every
    pair, fp32) and TRL's own DPO code on the export (its tokenization of the same records, its
    collator and per-pair log-prob sum, the model in training mode, fp32): for every pair that fits
    DPO_SEQ whole, the same ids, the same completion mask (the answer and its closing <|end|>) and
    the same per-pair log-probs."""
    import glob

    import numpy
    from datasets import Dataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from megatron_jai.data.chat import mask_prefix

    root, prefix = models["root"], str(models["root"] / "dpo")
    run_python(POSTTRAIN, "dpo-reference", "--init-from", models["chat"], "--data-path", prefix,
               "--seq-length", DPO_SEQ, "--global-batch-size", 4, "--micro-batch-size", 2,
               "--data-cache-dir", tmp_path / "cache")
    [ref_file] = glob.glob(f"{prefix}.dpo_ref.*.npz")
    ours = numpy.load(ref_file)["logps"]  # [pairs, (chosen, rejected)]

    with open(root / "dpo.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    pairs = Dataset.from_list([{"prompt": r["prompt"],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                               for r in records])
    model = _hf_model(root / "chat_hf", train=True)
    trainer = DPOTrainer(model=model, train_dataset=pairs,
                         processing_class=AutoTokenizer.from_pretrained(str(root / "chat_hf")),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True,
                                        max_length=None, trust_remote_code=True, report_to=[]))
    model.train()
    tokens, masks = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    end = trainer.processing_class.convert_tokens_to_ids("<|end|>")
    compared = 0
    for i, example in enumerate(trainer.train_dataset):
        prompt = example["prompt_ids"]
        answers = [example["chosen_ids"], example["rejected_ids"]]
        if max(len(prompt) + len(a) for a in answers) > DPO_SEQ:
            continue  # we cut it to DPO_SEQ tokens
        compared += 1
        for j, answer in enumerate(answers):
            assert tokens[2 * i + j].tolist() == prompt + answer, (i, j)
            assert masks[2 * i + j].tolist() == [0] * len(prompt) + [1] * len(answer), (i, j)
            assert answer[-1] == end
        theirs = trainer.compute_ref_log_probs(model, trainer.data_collator([example]))
        for j, answer in enumerate(answers):
            diff = abs(float(theirs[j][0]) - ours[i, j])
            assert diff <= 1e-5 * len(answer), (i, j, float(theirs[j][0]), ours[i, j])
    assert 10 <= compared < len(records), compared
