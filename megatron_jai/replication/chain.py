"""The replication chain: every stage is one or more calls of the project's command lines.

    data -> base tokenizer (English BPE + Phi-3's chat format) -> base model -> its HF export
    -> hf-to-mcore -> Thai BPE -> extended tokenizer -> vocab surgery -> DUS.v2
    -> JAI:       English recovery (snapshots) -> MoE from the snapshots -> Thai -> long context
    -> control a: the vocab-surgery model, the same three phases
    -> control b: the JAI architecture from random init, the same three phases
    -> SFT A, SFT B -> 1:1 merge -> DPO;  every stage's model exported to HF and evaluated

Layout of ``DIR``: ``data/``, ``tokenizers/``, ``configs/``, ``models/`` (Megatron checkpoints),
``hf/`` (exports; ``final_hf/`` is the DPO model's), ``eval/`` (``tools/evaluate.py`` JSON),
``metrics/`` (training metrics), ``logs/``, ``stages/``.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import List, Optional

from megatron_jai.paths import shared_path
from megatron_jai.replication.runner import Stage, StageRunner
from megatron_jai.replication.scales import (PHASES, Scale, base_model_config, dus_plan,
                                             phases)

PRETRAIN, POSTTRAIN = "pretrain_jai.py", "posttrain_jai.py"


def tool_path(name: str) -> str:
    return os.path.join("tools", f"{name}.py")


# SFT sources and the two mixes (docs/posttraining.md's end-to-end run): A Thai-heavy, B English-heavy.
SFT_SOURCES = ("th_sft_wangchanglm_oasst1", "th_sft_iapp_wiki_qa_train", "en_sft_dolly_open_qa",
               "en_sft_gsm8k_train")
SFT_MIX = {"sft-a": (0.2, 0.5, 0.15, 0.15), "sft-b": (0.1, 0.2, 0.35, 0.35)}
DPO_SOURCES = {"en": "en_dpo_hh_rlhf_harmless_test", "th": "th_dpo_wangchanglm_crowd"}
IAPP_VALID = "th_sft_iapp_wiki_qa_valid"  # evaluation only: never trained or tuned on
HELDOUT_EVERY = 10  # every 10th DPO pair (by line) is held out
ARMS = ("jai", "control-a", "control-b")


class Chain:
    def __init__(self, scale: Scale, out: str, seed: int, runner: StageRunner):
        self.scale, self.out, self.seed, self.runner = scale, os.path.abspath(out), seed, runner
        self.seeds = [seed + i for i in range(scale.seeds)]

    # ---- paths ---------------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def model(self, name: str) -> str:
        return self.path("models", name)

    def hf(self, name: str) -> str:
        return self.path("final_hf") if name == "dpo" else self.path("hf", name)

    def eval_dir(self, name: str) -> str:
        return self.path("eval", name)

    @property
    def base_ids(self) -> int:
        """Ids of the base tokenizer: its pieces and the special tokens above them."""
        from megatron_jai.data.tokenizer import load_tokenizer

        return load_tokenizer(self.path("tokenizers", "base")).vocab_size

    def tool(self, script: str, *argv) -> None:
        self.runner.tool(script, *argv)

    # ---- the stage list ------------------------------------------------------------------------
    def stages(self) -> List[Stage]:
        s: List[Stage] = []
        add = lambda name, what, fn: s.append(Stage(name, what, fn))  # noqa: E731
        sc = self.scale
        add("data", "slices of the shared training data", self.prepare_data)
        add("base-tokenizer", f"English BPE of {sc.base_vocab} pieces + Phi-3's chat format",
            self.base_tokenizer)
        add("base-data", "English text -> base-tokenizer ids", self.base_data)
        add("base-model", f"dense {sc.layers}-layer base model, {sc.base_steps} steps",
            self.base_model)
        add("export-base", "base model -> HF (the stand-in for Phi-3)", lambda: self.export("base"))
        s += self.evaluation_stages("base")
        add("convert", "HF base -> Megatron checkpoint", self.convert)
        add("thai-tokenizer", f"Thai BPE of {sc.thai_vocab} pieces", self.thai_tokenizer)
        add("extend-tokenizer", f"base + Thai -> {sc.target_vocab} ids", self.extend_tokenizer)
        add("tokens-per-char", "NTREX tokens per character, base and extended",
            self.tokens_per_char)
        add("vocab", "embedding surgery (new rows = mean of their base pieces)", self.vocab)
        s += self.model_stages("vocab")
        add("eval-vocab-as-base", "English bits/char over the base ids", self.vocab_as_base)
        add("dus", "DUS.v2 depth up-scaling", self.dus)
        s += self.model_stages("dus")
        add("pretrain-data", "English and Thai text -> extended-tokenizer ids", self.pretrain_data)
        for seed in self.seeds:
            first = seed == self.seeds[0]
            add(f"jai-english-s{seed}", f"JAI phase 1 (English recovery), seed {seed}",
                lambda seed=seed: self.jai_english(seed))
            if first:
                s += self.model_stages(f"jai-english-s{seed}")
                add("moe-one-snapshot", "MoE upcycling from one snapshot (the dense function)",
                    self.moe_one_snapshot)
                s += self.model_stages("moe-one-snapshot")
            add(f"jai-moe-s{seed}", "MoE upcycling: 4 experts, top-2, from the phase-1 snapshots",
                lambda seed=seed: self.jai_moe(seed))
            if first:
                s += self.model_stages(f"jai-moe-s{seed}")
            add(f"jai-s{seed}", f"JAI phases 2-3 (Thai injection, context extension), seed {seed}",
                lambda seed=seed: self.jai_thai_long(seed))
            if first:
                add(f"export-jai-thai-s{seed}", "phase-2 end -> HF",
                    lambda seed=seed: self.export(f"jai-thai-s{seed}", self.phase2_end(seed)))
                s += self.evaluation_stages(f"jai-thai-s{seed}")
            s += self.model_stages(f"jai-s{seed}")
            for arm in ARMS[1:]:
                add(f"{arm}-s{seed}", f"{arm}: the three phases, seed {seed}",
                    lambda arm=arm, seed=seed: self.control(arm, seed))
                s += self.model_stages(f"{arm}-s{seed}")
        first = self.seeds[0]
        add("eval-long-documents", "long-document bits/char before and after the extension",
            lambda: self.long_documents(first))
        add("curves", "bits/char of every saved checkpoint of the three arms",
            lambda: self.curves(first))
        add("chat-data", "chat data -> extended-tokenizer ids and loss masks", self.chat_data)
        for name in SFT_MIX:
            add(name, f"{name.upper()} from the pretrained JAI model",
                lambda name=name: self.sft(name, first))
            s += self.model_stages(name)
        add("merge", "1:1 linear merge of SFT A and SFT B", self.merge)
        s += self.model_stages("merge")
        add("dpo", "DPO from the merge", self.dpo)
        s += self.model_stages("dpo")
        add("dpo-heldout", "DPO accuracy on the held-out pairs", self.dpo_heldout)
        add("eval-dpo-checkpoint", "the final checkpoint itself (against its export)",
            self.final_checkpoint)
        add("iapp", "iApp QA: the pretrained JAI model, SFT A, SFT B, the merge, DPO",
            lambda: self.iapp(first))
        return s

    def model_stages(self, name: str) -> List[Stage]:
        return [Stage(f"export-{name}", f"{name} -> HF", lambda: self.export(name)),
                *self.evaluation_stages(name)]

    def evaluation_stages(self, name: str) -> List[Stage]:
        return [Stage(f"eval-{name}", "bits/char: Thai and English valid, NTREX",
                      lambda: self.evaluate_bits(name))]

    # ---- data ----------------------------------------------------------------------------------
    def prepare_data(self) -> dict:
        sc, data = self.scale, self.path("data")
        os.makedirs(os.path.join(data, "chat"), exist_ok=True)
        english = first_documents(shared_path("data", "english", "enwiki.train.jsonl.gz"),
                                  os.path.join(data, "en_train.jsonl"), sc.english_docs)
        thai = first_documents(shared_path("data", "thai", "thaigov_v2.train.jsonl.gz"),
                               os.path.join(data, "th_train.jsonl"), sc.thai_docs)
        for lang, rel, n in (("thai", ("thai", "thaigov_v2.valid.jsonl.gz"), sc.thai_eval_docs),
                             ("english", ("english", "enwiki.valid.jsonl.gz"), sc.english_eval_docs)):
            first_documents(shared_path("data", *rel), os.path.join(data, f"{lang}_valid.jsonl"), n,
                            cut=sc.eval_chars)
        for name, n in [(src, sc.sft_records) for src in SFT_SOURCES] + [(IAPP_VALID, sc.iapp_items)]:
            first_lines(shared_path("data", "post", f"{name}.jsonl.gz"),
                        os.path.join(data, "chat", f"{name}.jsonl"), n)
        pairs = {}
        for lang, name in DPO_SOURCES.items():
            train, heldout = split_heldout(shared_path("data", "post", f"{name}.jsonl.gz"))
            train, heldout = train[:sc.dpo_pairs], heldout[:sc.dpo_heldout_pairs]
            for split, lines in (("train", train), ("heldout", heldout)):
                with open(os.path.join(data, "chat", f"{lang}_dpo_{split}.jsonl"), "w",
                          encoding="utf-8") as f:
                    f.writelines(lines)
                pairs[f"{lang}_dpo_{split}"] = len(lines)
        return {"english_characters": english, "thai_characters": thai, "dpo_pairs": pairs}

    # ---- the base model ------------------------------------------------------------------------
    def base_tokenizer(self) -> None:
        self.tool(tool_path("train_tokenizer"), "--input", self.path("data", "en_train.jsonl"),
                  "--vocab-size", self.scale.base_vocab, "--special-tokens-from", "phi3",
                  "--out", self.path("tokenizers", "base"), "--quiet", "--force")

    def base_data(self) -> None:
        self.preprocess("en_train.jsonl", "en_base", self.path("tokenizers", "base"))

    def preprocess(self, src: str, prefix: str, tokenizer: str) -> None:
        self.tool(tool_path("preprocess_data"), "--input", self.path("data", src), "--output-prefix",
                  self.path("data", prefix), "--tokenizer", tokenizer, "--workers", 1,
                  "--no-progress", "--force")

    def base_model(self) -> None:
        sc = self.scale
        config = self.path("configs", "base_model.json")
        _write_json(config, base_model_config(sc, self.base_ids))
        self.train(PRETRAIN, "base", "--model", config, "--tokenizer",
                   self.path("tokenizers", "base"), "--data-path", self.path("data", "en_base"),
                   "--seq-length", sc.seq, "--micro-batch-size", sc.batch, "--global-batch-size",
                   sc.batch, "--train-iters", sc.base_steps, "--lr", sc.base_lr,
                   "--min-lr", sc.base_lr * sc.min_lr_ratio, "--warmup-iters",
                   max(1, sc.base_steps // 20), "--seed", self.seed)

    def train(self, script: str, name: str, *argv) -> None:
        """A training run (``argv``: a posttrain mode first) that saves into, and resumes from,
        ``models/NAME``."""
        root = self.model(name)
        self.tool(script, *argv, "--save", root, "--load", root, "--metrics-file",
                  self.path("metrics", f"{name}.jsonl"), "--data-cache-dir", self.path("cache"),
                  "--log-interval", max(1, self.scale.phase_steps[0] // 10))

    def export(self, name: str, source: Optional[str] = None) -> dict:
        out = self.hf(name)
        self.tool(tool_path("convert_checkpoint"), "mcore-to-hf", "--mcore-dir",
                  source or self.model(name), "--out", out, "--no-progress", "--force")
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            return {"hf": out, "architectures": json.load(f).get("architectures")}

    def evaluate_bits(self, name: str, model: Optional[str] = None, ntrex: bool = True) -> None:
        """``eval/NAME/bits.json``: bits per character of the Thai and English validation slices
        and of NTREX (both languages), at the short context."""
        sc, out = self.scale, self.eval_dir(name)
        os.makedirs(out, exist_ok=True)
        tasks = ("--task", "ntrex_tha", "--task", "ntrex_eng", "--limit", sc.ntrex_lines)
        self.evaluate(model or self.hf(name), os.path.join(out, "bits.json"),
                      "--text", self.path("data", "thai_valid.jsonl"),
                      "--text", self.path("data", "english_valid.jsonl"),
                      *(tasks if ntrex else ()), "--context", sc.seq)

    def evaluate(self, model: str, output: str, *argv) -> None:
        self.tool(tool_path("evaluate"), "--model", model, *argv, "--output", output, "--no-progress")

    # ---- the recipe ----------------------------------------------------------------------------
    def convert(self) -> None:
        self.tool(tool_path("convert_checkpoint"), "hf-to-mcore", "--hf-dir", self.hf("base"), "--out",
                  self.model("base-mcore"), "--no-progress", "--force")

    def thai_tokenizer(self) -> None:
        self.tool(tool_path("train_tokenizer"), "--input", self.path("data", "th_train.jsonl"),
                  "--vocab-size", self.scale.thai_vocab, "--clean", "thaigov", "--out",
                  self.path("tokenizers", "thai"), "--quiet", "--force")

    def extend_tokenizer(self) -> None:
        self.tool(tool_path("extend_tokenizer"), "--base", self.hf("base"), "--add",
                  self.path("tokenizers", "thai"), "--target-vocab", self.scale.target_vocab,
                  "--out", self.path("tokenizers", "extended"), "--force")

    def tokens_per_char(self) -> None:
        self.tool(tool_path("tokens_per_char"), "--tokenizer", self.hf("base"), "--tokenizer",
                  self.path("tokenizers", "extended"), "--text",
                  shared_path("data", "eval", "ntrex128.tha.txt"), "--text",
                  shared_path("data", "eval", "ntrex128.eng.txt"), "--json",
                  self.path("eval", "tokens_per_char.json"))

    def vocab(self) -> None:
        self.tool(tool_path("upscale"), "vocab", "--in", self.model("base-mcore"), "--tokenizer",
                  self.path("tokenizers", "extended"), "--out", self.model("vocab"), "--force")

    def vocab_as_base(self) -> None:
        self.evaluate(self.hf("vocab"), os.path.join(self.eval_dir("vocab"),
                                                     "english_base_ids.json"),
                      "--text", self.path("data", "english_valid.jsonl"), "--context",
                      self.scale.seq, "--score-vocab", self.base_ids)

    def dus(self) -> None:
        plan = self.path("configs", "dus_plan.json")
        _write_json(plan, dus_plan(self.scale))
        self.tool(tool_path("upscale"), "dus", "--in", self.model("vocab"), "--plan", plan, "--out",
                  self.model("dus"), "--force")

    def pretrain_data(self) -> dict:
        tok = self.path("tokenizers", "extended")
        self.preprocess("en_train.jsonl", "en", tok)
        self.preprocess("th_train.jsonl", "th", tok)
        return {"long_documents": write_long_documents(
            tok, self.path("data", "long_valid.jsonl"), self.scale)}

    # ---- continued pretraining: JAI and the controls -------------------------------------------
    def run_config(self, name: str, which=PHASES) -> str:
        import yaml

        path = self.path("configs", f"{name}.yaml")
        config = {"data": {"english": self.path("data", "en"), "thai": self.path("data", "th")},
                  "phases": phases(self.scale, which)}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return path

    def pretrain(self, name: str, config: str, seed: int, *argv) -> None:
        sc = self.scale
        # the first seed keeps every save (the points of the curves), the others the last three
        keep = sum(sc.phase_steps) // self.snapshot_interval + len(PHASES) + 1
        self.train(PRETRAIN, name, "--config", config, *argv, "--micro-batch-size", sc.batch,
                   "--global-batch-size", sc.batch, "--lr", sc.lr, "--min-lr",
                   sc.lr * sc.min_lr_ratio, "--save-interval", self.snapshot_interval,
                   "--keep-last", keep if seed == self.seeds[0] else 3, "--seed", seed)

    @property
    def snapshot_interval(self) -> int:
        """JAI-1 takes its 4 experts at 0/2K/4K/6K steps of English recovery: here at 0, 1/3, 2/3
        and the end of phase 1; every run saves at that interval (the points of the curves)."""
        return self.scale.phase_steps[0] // 3

    def jai_english(self, seed: int) -> None:
        self.pretrain(f"jai-english-s{seed}", self.run_config("english", PHASES[:1]), seed,
                      "--init-from", self.model("dus"))

    def snapshots(self, seed: int) -> List[str]:
        """The DUS model and the saves at 1/3, 2/3 and the end of phase 1."""
        root, k = self.model(f"jai-english-s{seed}"), self.snapshot_interval
        return [self.model("dus")] + [os.path.join(root, f"iter_{i * k:07d}") for i in (1, 2, 3)]

    def jai_moe(self, seed: int) -> dict:
        inputs = self.snapshots(seed)
        # Attention, norms and embeddings from the end of phase 1 (the last snapshot), as JAI-1
        # continues from the end of English recovery; the experts from all four.
        self.tool(tool_path("upscale"), "moe", "--in", *inputs, "--shared-from", "last", "--experts",
                  4, "--top-k", 2, "--seed", seed, "--out", self.model(f"jai-moe-s{seed}"), "--force")
        return {"snapshots": inputs}

    def moe_one_snapshot(self) -> None:
        self.tool(tool_path("upscale"), "moe", "--in", self.model(f"jai-english-s{self.seeds[0]}"),
                  "--experts", 4, "--top-k", 2, "--out", self.model("moe-one-snapshot"), "--force")

    def jai_thai_long(self, seed: int) -> None:
        self.pretrain(f"jai-s{seed}", self.run_config("thai-long", PHASES[1:]), seed,
                      "--init-from", self.model(f"jai-moe-s{seed}"))

    def phase2_end(self, seed: int) -> str:
        return os.path.join(self.model(f"jai-s{seed}"), f"iter_{self.scale.phase_steps[1]:07d}")

    def control(self, arm: str, seed: int) -> None:
        config = self.run_config("all-phases")
        if arm == "control-a":  # the dense base with only the tokenizer surgery
            start = ("--init-from", self.model("vocab"))
        else:  # the JAI architecture (DUS skips, 4 experts), random init
            start = ("--model", os.path.join(self.model(f"jai-moe-s{self.seeds[0]}"),
                                             "model_config.json"),
                     "--tokenizer", self.path("tokenizers", "extended"))
        self.pretrain(f"{arm}-s{seed}", config, seed, *start)

    # ---- evaluations beyond the bits of each model ---------------------------------------------
    def long_documents(self, seed: int) -> None:
        sc, text, out = self.scale, self.path("data", "long_valid.jsonl"), self.path("eval", "long")
        os.makedirs(out, exist_ok=True)
        for name, model, context in ((f"jai-thai-s{seed}", self.hf(f"jai-thai-s{seed}"), sc.seq),
                                     (f"jai-s{seed}", self.hf(f"jai-s{seed}"), sc.long_seq),
                                     (f"jai-s{seed}-short", self.hf(f"jai-s{seed}"), sc.seq)):
            self.evaluate(model, os.path.join(out, f"{name}.json"), "--text", text, "--context",
                          context)

    def curves(self, seed: int) -> dict:
        """Thai and English valid bits/char of the saved checkpoints of the three arms (phase ends
        at the smoke scale, every snapshot-interval save at the small scale)."""
        sc, points = self.scale, []
        ends = {sum(sc.phase_steps[:i + 1]) for i in range(3)}
        runs = {"jai": [(f"jai-english-s{seed}", 0), (f"jai-s{seed}", sc.phase_steps[0])],
                "control-a": [(f"control-a-s{seed}", 0)], "control-b": [(f"control-b-s{seed}", 0)]}
        for arm, parts in runs.items():
            for run, offset in parts:
                for it in saved_iterations(self.model(run)):
                    if sc.curve_points < 2 and offset + it not in ends:
                        continue
                    out = self.path("eval", "curve", arm, f"step{offset + it:06d}")
                    self.evaluate_bits(os.path.relpath(out, self.path("eval")), ntrex=False,
                                       model=os.path.join(self.model(run), f"iter_{it:07d}"))
                    points.append({"arm": arm, "step": offset + it, "eval": out})
        return {"points": points}

    # ---- post-training -------------------------------------------------------------------------
    def chat_data(self) -> None:
        chat, tok = self.path("data", "chat"), self.path("tokenizers", "extended")
        seq = self.scale.long_seq
        for name in (*SFT_SOURCES, IAPP_VALID):
            self.tool(tool_path("preprocess_chat"), "--kind", "sft", "--input",
                      os.path.join(chat, f"{name}.jsonl"), "--output-prefix",
                      os.path.join(chat, name), "--tokenizer", tok, "--seq-length", seq,
                      "--max-bad-fraction", 1, "--workers", 1, "--no-progress", "--force")
        for lang in DPO_SOURCES:
            for split in ("train", "heldout"):
                name = f"{lang}_dpo_{split}"
                self.tool(tool_path("preprocess_chat"), "--kind", "dpo", "--input",
                          os.path.join(chat, f"{name}.jsonl"), "--output-prefix",
                          os.path.join(chat, name), "--tokenizer", tok, "--seq-length",
                          self.scale.dpo_seq,
                          "--max-bad-fraction", 1, "--workers", 1, "--no-progress", "--force")

    def sft(self, name: str, seed: int) -> None:
        sc, chat = self.scale, self.path("data", "chat")
        blend = [a for w, src in zip(SFT_MIX[name], SFT_SOURCES) for a in (w, os.path.join(chat, src))]
        self.train(POSTTRAIN, name, "sft", "--init-from", self.model(f"jai-s{seed}"),
                   "--data-path", *blend, "--seq-length", sc.long_seq, "--micro-batch-size",
                   sc.sft_batch, "--global-batch-size", sc.sft_batch, "--train-iters", sc.sft_steps,
                   "--lr", sc.sft_lr, "--min-lr", sc.sft_lr * sc.min_lr_ratio, "--warmup-iters",
                   max(1, sc.sft_steps // 10), "--seed", seed + (name == "sft-b"))

    def merge(self) -> None:
        self.tool(tool_path("merge_checkpoints"), "--method", "linear", "--inputs", self.model("sft-a"),
                  self.model("sft-b"), "--out", self.model("merge"), "--no-progress", "--force")

    def dpo(self) -> None:
        sc, chat = self.scale, self.path("data", "chat")
        self.train(POSTTRAIN, "dpo", "dpo", "--init-from", self.model("merge"), "--data-path",
                   0.7, os.path.join(chat, "en_dpo_train"), 0.3, os.path.join(chat, "th_dpo_train"),
                   "--seq-length", sc.dpo_seq, "--micro-batch-size", 1, "--global-batch-size",
                   sc.dpo_batch, "--train-iters", sc.dpo_steps, "--lr", sc.dpo_lr, "--min-lr",
                   sc.dpo_lr * sc.min_lr_ratio, "--warmup-iters", max(1, sc.dpo_steps // 10),
                   "--dpo-beta", 0.1, "--seed", self.seeds[0])

    def dpo_heldout(self) -> dict:
        """Held-out pairs against the merge (DPO's reference), every pair once (global batch = the
        pairs, one evaluation batch)."""
        heldout = [self.path("data", "chat", f"{lang}_dpo_heldout") for lang in DPO_SOURCES]
        self.tool(POSTTRAIN, "dpo-reference", "--reference", self.model("merge"), "--data-path",
                  heldout[0], "--valid-data-path", *heldout[1:], "--seq-length",
                  self.scale.dpo_seq, "--micro-batch-size", 1, "--global-batch-size", 1)
        out = {}
        for lang in DPO_SOURCES:
            prefix = self.path("data", "chat", f"{lang}_dpo_heldout")
            with open(prefix + ".meta.json", encoding="utf-8") as f:
                pairs = json.load(f)["records"]
            metrics = self.path("eval", f"dpo_heldout_{lang}.jsonl")
            if os.path.exists(metrics):
                os.remove(metrics)
            self.tool(POSTTRAIN, "dpo", "--eval-only", "--init-from", self.model("dpo"),
                      "--reference", self.model("merge"), "--valid-data-path", prefix,
                      "--seq-length", self.scale.dpo_seq, "--micro-batch-size", 1,
                      "--global-batch-size", pairs, "--eval-iters", 1, "--metrics-file", metrics)
            out[lang] = {"pairs": pairs, "metrics": metrics}
        return out

    def final_checkpoint(self) -> None:
        self.evaluate_bits("dpo-checkpoint", model=self.model("dpo"))

    def iapp(self, seed: int) -> None:
        """iApp QA (evaluation only) of the pretrained model and the post-trained ones: exact match
        and F1 of greedy answers through the chat template, and the SFT loss of the reference
        answers (every record that fits the context, once)."""
        out, valid = self.path("eval", "iapp"), self.path("data", "chat", IAPP_VALID)
        os.makedirs(out, exist_ok=True)
        with open(valid + ".meta.json", encoding="utf-8") as f:
            records = json.load(f)["records"]
        for name in (f"jai-s{seed}", *SFT_MIX, "merge", "dpo"):
            self.evaluate(self.hf(name), os.path.join(out, f"{name}.json"), "--task", "iapp_qa",
                          "--chat", "--limit", self.scale.iapp_items, "--max-new-tokens", 32)
            metrics = os.path.join(out, f"{name}.loss.jsonl")
            if os.path.exists(metrics):
                os.remove(metrics)
            if not records:  # no record fits the context
                continue
            self.tool(POSTTRAIN, "sft", "--eval-only", "--init-from", self.model(name),
                      "--valid-data-path", valid, "--seq-length", self.scale.long_seq,
                      "--micro-batch-size", 1, "--global-batch-size", records, "--eval-iters", 1,
                      "--metrics-file", metrics)


# ---- helpers -----------------------------------------------------------------------------------
def first_documents(src: str, dst: str, n: int, cut: Optional[int] = None) -> int:
    """The first ``n`` documents of a shared jsonl.gz (their ``text`` only, the first ``cut``
    characters of each when given); returns the characters written."""
    chars = 0
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst + ".tmp", "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            text = json.loads(line)["text"][:cut]
            chars += len(text)
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(dst + ".tmp", dst)
    return chars


def first_lines(src: str, dst: str, n: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            out.write(line)


def split_heldout(src: str) -> tuple:
    """(training lines, held-out lines): every HELDOUT_EVERY-th line (1-based) is held out."""
    train, heldout = [], []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            (heldout if i % HELDOUT_EVERY == 0 else train).append(line)
    return train, heldout


def write_long_documents(tokenizer: str, dst: str, scale: Scale) -> dict:
    """The first ``scale.long_docs`` Thai and English validation documents that are longer than the
    long context (in extended-tokenizer tokens), each cut to about twice the long context."""
    from megatron_jai.data.tokenizer import load_tokenizer

    tok, counts = load_tokenizer(tokenizer), {}
    with open(dst + ".tmp", "w", encoding="utf-8") as out:
        for lang, rel in (("thai", ("thai", "thaigov_v2.valid.jsonl.gz")),
                          ("english", ("english", "enwiki.valid.jsonl.gz"))):
            n = 0
            with gzip.open(shared_path("data", *rel), "rt", encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"]
                    tokens = len(tok.encode(text))
                    if tokens <= scale.long_seq:
                        continue
                    text = text[: int(len(text) * min(1.0, 2 * scale.long_seq / tokens))]
                    out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    n += 1
                    if n >= scale.long_docs:
                        break
            counts[lang] = n
    os.replace(dst + ".tmp", dst)
    return counts


def saved_iterations(root: str) -> List[int]:
    return sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
