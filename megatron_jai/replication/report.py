"""The report of a replication run: every number in ``DIR/report.json``, the tables in
``DIR/report.md`` and the plots in ``DIR/images/`` (named as in ``docs/images/``, so publishing is
a copy of ``report.md`` into ``docs/replication.md`` and of the images into ``docs/images/``).

* ``checks``: function preservation per surgery (name, value, limit, passed);
* ``hypotheses``: JAI-1's claims (id, claim, measured, holds), written whatever the outcome;
* ``models``: bits per character of every stage's model (Thai and English valid slices, NTREX);
* ``comparison``: final Thai / English bits per character of JAI and the controls per seed;
* ``curves``: bits per character of the three arms against the tokens after the base model;
* ``final``: the DPO model's export ``DIR/final_hf`` and its numbers.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List

from megatron_jai.replication.scales import PHASES, SCALES, THAI_SHARE, Scale

TEXTS = {"thai_valid": "thai_valid.jsonl", "english_valid": "english_valid.jsonl",
         "ntrex_tha": "ntrex_tha", "ntrex_eng": "ntrex_eng"}
ARM_LABELS = {"jai": "JAI (DUS + MoE from snapshots)", "control-a": "(a) dense base + tokenizer",
              "control-b": "(b) JAI architecture from random init"}
IMAGES = {"curves": "replication_bits_per_char.png", "router": "replication_expert_load.png"}


class Results:
    """Reads what the stages wrote under ``DIR``."""

    def __init__(self, out: str, scale: Scale, seed: int):
        self.out, self.scale, self.seeds = out, scale, [seed + i for i in range(scale.seeds)]

    def json(self, *parts) -> dict:
        with open(os.path.join(self.out, *parts), encoding="utf-8") as f:
            return json.load(f)

    def stage(self, name: str) -> dict:
        return self.json("stages", f"{name}.json")

    def bits(self, name: str) -> Dict[str, float]:
        """Bits per character of the evaluation texts under ``eval/NAME/bits.json``."""
        values = self.json("eval", name, "bits.json")["bits_per_char"]
        return {key: values[file] for key, file in TEXTS.items() if file in values}

    def evaluated_models(self) -> List[str]:
        root = os.path.join(self.out, "eval")
        return sorted(d for d in os.listdir(root)
                      if os.path.isfile(os.path.join(root, d, "bits.json")))

    def params(self, model: str) -> dict:
        from megatron_jai.config import ModelConfig

        cfg = ModelConfig.load(os.path.join(self.out, "models", model, "model_config.json"))
        counts = cfg.parameter_counts()
        return {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                "experts": cfg.num_experts, "skips": len(cfg.skip_connections),
                "total": counts["total"], "active": counts["active"]}


def build_report(out: str, run: dict, rows: List[tuple]) -> dict:
    scale = SCALES[run["scale"]["name"]]
    r = Results(out, scale, run["seed"])
    s1 = r.seeds[0]
    models = {m: r.bits(m) for m in r.evaluated_models() if not m.startswith("curve")}
    report = {
        "scale": run["scale"], "seed": run["seed"], "seeds": r.seeds, "commit": run["commit"],
        "command": run["command"],
        "wall_seconds": sum(seconds for _, _, seconds in rows),
        "stages": [{"stage": name, "seconds": round(seconds, 1),
                    "cpu_seconds": round(r.stage(name).get("cpu_seconds", 0.0), 1)}
                   for name, _, seconds in rows],
        "sizes": sizes(r), "models": models, "tokens_per_char": tokens_per_char(r),
        "comparison": comparison(r, models), "long_documents": long_documents(r),
        "post_training": post_training(r), "curves": curves(r),
        "final": {"hf": os.path.join(out, "final_hf"), "bits_per_char": models["dpo"]},
    }
    report["checks"] = checks(r, models)
    report["hypotheses"] = hypotheses(report, models, s1)
    return report


def write_report(out: str, run: dict, runner, stream) -> dict:
    report = build_report(out, run, runner.rows)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    plot_curves(report, os.path.join(out, "images", IMAGES["curves"]))
    plot_router(report, os.path.join(out, "images", IMAGES["router"]))
    _write(os.path.join(out, "report.json"), json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    _write(os.path.join(out, "report.md"), markdown(report))
    print(summary(report, runner.rows), file=stream, flush=True)
    return report


# ---- the measurements --------------------------------------------------------------------------
def sizes(r: Results) -> dict:
    sc, s1 = r.scale, r.seeds[0]
    tokens = sc.phase_tokens
    return {"base": r.params("base"), "jai": r.params(f"jai-s{s1}"),
            "control-a": r.params(f"control-a-s{s1}"), "control-b": r.params(f"control-b-s{s1}"),
            "base_pretraining_tokens": sc.base_steps * sc.batch * sc.seq,
            "phase_tokens": dict(zip(PHASES, tokens)), "tokens_after_base": sum(tokens),
            "seq_length": sc.seq, "long_seq_length": sc.long_seq,
            "long_rotary_base": sc.long_rotary_base, "thai_share": THAI_SHARE}


def tokens_per_char(r: Results) -> dict:
    out = {}
    for row in r.json("eval", "tokens_per_char.json"):
        which = "base" if row["tokenizer"].endswith(os.path.join("hf", "base")) else "extended"
        lang = "thai" if "tha" in row["text"] else "english"
        out.setdefault(which, {})[lang] = {"tokens_per_char": row["tokens_per_char"],
                                           "tokens": row["tokens"]}
    return out


def comparison(r: Results, models: dict) -> dict:
    """Final bits per character of the three arms, per seed, with mean and spread (half the range)."""
    out = {}
    for key in ("thai_valid", "english_valid", "ntrex_tha", "ntrex_eng"):
        out[key] = {}
        for arm in ("jai", "control-a", "control-b"):
            values = [models[f"{arm}-s{s}"][key] for s in r.seeds]
            out[key][arm] = {"seeds": values, "mean": statistics.fmean(values),
                             "spread": (max(values) - min(values)) / 2}
    return out


def long_documents(r: Results) -> dict:
    s1, out = r.seeds[0], {}
    for name, model, context in ((f"jai-thai-s{s1}", "after phase 2", r.scale.seq),
                                 (f"jai-s{s1}-short", "after phase 3", r.scale.seq),
                                 (f"jai-s{s1}", "after phase 3", r.scale.long_seq)):
        result = r.json("eval", "long", f"{name}.json")
        task = next(iter(result["tasks"].values()))
        out[name] = {"model": model, "context": context, "bits_per_char": task["bits_per_char"],
                     "documents": task["documents"], "tokens": task["tokens"]}
    return out


def post_training(r: Results) -> dict:
    s1 = r.seeds[0]
    iapp = {}
    for name in (f"jai-s{s1}", "sft-a", "sft-b", "merge", "dpo"):
        task = r.json("eval", "iapp", f"{name}.json")["tasks"]["iapp_qa"]
        iapp[name] = {k: task.get(k) for k in ("exact_match", "f1", "items", "skipped")}
        iapp[name]["answer_loss"] = last_record(os.path.join(
            r.out, "eval", "iapp", f"{name}.loss.jsonl")).get("valid_loss")
    heldout = {}
    for lang, info in r.stage("dpo-heldout").items():
        if not isinstance(info, dict) or "metrics" not in info:
            continue
        record = last_record(info["metrics"])
        heldout[lang] = {"pairs": info["pairs"], "accuracy": record.get("valid_accuracy"),
                         "margin": record.get("valid_margin"), "loss": record.get("valid_loss")}
    pairs = sum(h["pairs"] for h in heldout.values())
    accuracy = sum(h["pairs"] * h["accuracy"] for h in heldout.values()) / pairs if pairs else None
    return {"iapp": iapp, "dpo_heldout": heldout, "dpo_heldout_accuracy": accuracy}


def last_record(path: str) -> dict:
    """The last JSON line of a metrics file (an evaluation's result); empty when there is none."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][-1]


def curves(r: Results) -> List[dict]:
    """Points (arm, step, tokens after the base, bits per character, expert load) of the curves."""
    sc = r.scale
    tokens_per_step = sc.batch * sc.seq
    # where the arms start: JAI from the DUS model, (a) from the vocab-surgery model
    points = [{"arm": arm, "step": 0, "tokens": 0, "bits_per_char": r.bits(model)}
              for arm, model in (("jai", "dus"), ("control-a", "vocab"))]
    for p in r.stage("curves")["points"]:
        result = r.json(os.path.relpath(p["eval"], r.out), "bits.json")
        bits = {key: result["bits_per_char"][file] for key, file in TEXTS.items()
                if file in result["bits_per_char"]}
        load = {key: result["tasks"][file].get("expert_load") for key, file in TEXTS.items()
                if file in result["tasks"] and result["tasks"][file].get("expert_load")}
        points.append({"arm": p["arm"], "step": p["step"], "tokens": p["step"] * tokens_per_step,
                       "bits_per_char": bits, **({"expert_load": load} if load else {})})
    return points


def checks(r: Results, models: dict) -> List[dict]:
    s1 = r.seeds[0]
    vocab_as_base = r.json("eval", "vocab", "english_base_ids.json")["bits_per_char"]
    english = TEXTS["english_valid"]

    def check(name, value, limit):
        return {"name": name, "value": value, "limit": limit, "passed": bool(value <= limit)}

    export = max(abs(models["dpo-checkpoint"][k] - models["dpo"][k]) for k in models["dpo"])
    return [
        check("tokenizer extension keeps the function: English valid bits/char, base vs extended "
              "model over the base ids", abs(models["base"]["english_valid"] - vocab_as_base[english]),
              1e-4),
        check("MoE upcycling with every expert from one snapshot keeps the function: English valid "
              "bits/char, dense vs upcycled",
              abs(models[f"jai-english-s{s1}"]["english_valid"]
                  - models["moe-one-snapshot"]["english_valid"]), 1e-5),
        check("the final checkpoint and its HF export agree: largest bits/char difference over the "
              "four texts", export, 1e-4),
    ]


def _pct(new: float, old: float) -> str:
    return f"{100 * (new - old) / old:+.1f}%"


def hypotheses(report: dict, models: dict, s1: int) -> List[dict]:
    en = {m: v["english_valid"] for m, v in models.items()}
    th = {m: v["thai_valid"] for m, v in models.items()}
    base, dus, moe = en["base"], en["dus"], en[f"jai-moe-s{s1}"]
    out = []

    def add(hid, claim, measured, holds):
        out.append({"id": hid, "claim": claim, "measured": measured, "holds": bool(holds)})

    add("H1", "Upscaling costs English at start-up (the reason for English recovery): English "
              "bits/char after DUS and after MoE upcycling are above the base model's",
        f"English valid bits/char: base {base:.4f}; after the tokenizer extension "
        f"{en['vocab']:.4f} ({_pct(en['vocab'], base)}); after DUS {dus:.4f} ({_pct(dus, base)}; "
        f"{_pct(dus, en['vocab'])} over the model it grows); after MoE from the snapshots "
        f"{moe:.4f} ({_pct(moe, base)}; {_pct(moe, en[f'jai-english-s{s1}'])} over the phase-1 end)",
        dus > base and moe > base)
    recovered = en[f"jai-english-s{s1}"]
    add("H2", "English recovery brings English bits/char back to the base model's or below",
        f"English valid bits/char: base {base:.4f}, after DUS {dus:.4f}, after English recovery "
        f"{recovered:.4f} ({_pct(recovered, base)})", recovered <= base)
    thai_base, thai2, en2 = th["base"], th[f"jai-thai-s{s1}"], en[f"jai-thai-s{s1}"]
    add("H3", "The Thai phase cuts Thai bits/char far (at least 20%) below the base model's, "
              "while English bits/char stays within 3% of the base model's",
        f"after the Thai phase: Thai valid {thai2:.4f} vs base {thai_base:.4f} "
        f"({_pct(thai2, thai_base)}); English valid {en2:.4f} vs {base:.4f} ({_pct(en2, base)})",
        thai2 <= 0.8 * thai_base and en2 <= 1.03 * base)
    c = report["comparison"]["thai_valid"]
    jai_worst = max(c["jai"]["seeds"])
    add("H4", "The final Thai bits/char of JAI is below both controls' (same tokens after the "
              "base), for every seed",
        "final Thai valid bits/char (seeds " + ", ".join(map(str, report["seeds"])) + "): " +
        "; ".join(f"{arm} " + " / ".join(f"{v:.4f}" for v in c[arm]["seeds"]) +
                  f" (mean {c[arm]['mean']:.4f} ± {c[arm]['spread']:.4f})" for arm in c),
        jai_worst < min(c["control-a"]["seeds"]) and jai_worst < min(c["control-b"]["seeds"]))
    ld = report["long_documents"]
    before, after, short = (ld[f"jai-thai-s{s1}"], ld[f"jai-s{s1}"], ld[f"jai-s{s1}-short"])
    add("H5", "The context extension improves bits/char on documents longer than the short "
              "context",
        f"{after['documents']} long validation documents: after phase 2 at its {before['context']}-"
        f"token context {before['bits_per_char']:.4f}; after phase 3 at {after['context']} tokens "
        f"{after['bits_per_char']:.4f} (at {short['context']} tokens {short['bits_per_char']:.4f})",
        after["bits_per_char"] < before["bits_per_char"])
    t = report["tokens_per_char"]
    add("H6", "Thai tokens per character fall with the extended tokenizer, and English is "
              "unchanged",
        f"NTREX Thai {t['base']['thai']['tokens_per_char']:.3f} -> "
        f"{t['extended']['thai']['tokens_per_char']:.3f}; English "
        f"{t['base']['english']['tokens_per_char']:.3f} -> "
        f"{t['extended']['english']['tokens_per_char']:.3f} ({t['base']['english']['tokens']:,} -> "
        f"{t['extended']['english']['tokens']:,} tokens)",
        t["extended"]["thai"]["tokens_per_char"] < t["base"]["thai"]["tokens_per_char"]
        and t["extended"]["english"]["tokens"] == t["base"]["english"]["tokens"])
    pt = report["post_training"]
    f1 = {m: v["f1"] for m, v in pt["iapp"].items()}
    loss = {m: v["answer_loss"] for m, v in pt["iapp"].items()}
    pre, a, b, merged = f1[f"jai-s{s1}"], f1["sft-a"], f1["sft-b"], f1["merge"]
    acc = pt["dpo_heldout_accuracy"]
    order = (f"jai-s{s1}", "sft-a", "sft-b", "merge", "dpo")
    add("H7", "SFT improves iApp F1 over the pretrained model (both SFTs), the merge lands between "
              "the two SFTs, and DPO's held-out accuracy is above 0.5",
        f"iApp F1 (pretrained, SFT A, SFT B, merge, DPO): "
        + ", ".join(f"{f1[m]:.4f}" for m in order) + "; answer loss: "
        + ", ".join(_fmt(loss[m], 3) for m in order) + f"; DPO held-out accuracy {acc:.3f} "
        f"({sum(h['pairs'] for h in pt['dpo_heldout'].values())} pairs)",
        a > pre and b > pre and min(a, b) <= merged <= max(a, b) and acc > 0.5)
    return out


# ---- output ------------------------------------------------------------------------------------
def _fmt(x, digits=4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _table(head: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


MODEL_ORDER = [("base", "base model (English, the stand-in for Phi-3)"),
               ("vocab", "tokenizer extension + vocab surgery"), ("dus", "DUS.v2"),
               ("jai-english-s{s}", "JAI after English recovery (phase 1)"),
               ("moe-one-snapshot", "MoE, every expert from one snapshot (check)"),
               ("jai-moe-s{s}", "MoE from the 4 snapshots"),
               ("jai-thai-s{s}", "JAI after Thai injection (phase 2)"),
               ("jai-s{s}", "JAI after context extension (phase 3)"),
               ("control-a-s{s}", "control (a) after the three phases"),
               ("control-b-s{s}", "control (b) after the three phases"),
               ("sft-a", "SFT A (Thai-heavy)"), ("sft-b", "SFT B (English-heavy)"),
               ("merge", "merge of SFT A and B (1:1)"), ("dpo", "DPO (final, `final_hf/`)")]


# Stage groups of the time table (first matching prefix).
STAGE_GROUPS = (("exports", ("export-",)),
                ("evaluation", ("eval-", "curves", "iapp", "dpo-heldout")),
                ("data, tokenizers, preprocessing", ("data", "base-tokenizer", "base-data", "convert",
                                                     "thai-tokenizer", "extend-tokenizer",
                                                     "tokens-per-char", "pretrain-data", "chat-data")),
                ("base model", ("base-model",)),
                ("JAI: surgery, phase 1, MoE, phases 2-3", ("vocab", "dus", "jai-", "moe-one")),
                ("control (a)", ("control-a-",)), ("control (b)", ("control-b-",)),
                ("SFT A and B, merge, DPO", ("sft-", "merge", "dpo")))


def stage_group(name: str) -> str:
    return next(group for group, prefixes in STAGE_GROUPS if name.startswith(prefixes))


def markdown(report: dict) -> str:
    s1 = report["seeds"][0]
    sz = report["sizes"]
    lines = [f"Run `{report['command']}` at commit `{report['commit'][:12]}`: {len(report['stages'])} "
             f"stages, {report['wall_seconds'] / 60:.1f} minutes of stage wall time, seeds "
             f"{', '.join(map(str, report['seeds']))}.", ""]
    lines += ["### Sizes", "", _table(["model", "layers", "hidden", "vocabulary", "experts", "skips",
                                       "parameters (total / active)"], [
        [label, p["layers"], p["hidden"], p["vocab"], p["experts"] or "dense", p["skips"],
         f"{p['total'] / 1e6:.2f}M / {p['active'] / 1e6:.2f}M"]
        for label, p in (("base", sz["base"]), ("JAI", sz["jai"]), ("control (a)", sz["control-a"]),
                         ("control (b)", sz["control-b"]))]), "",
        f"Base pretraining {sz['base_pretraining_tokens']:,} tokens; after the base every arm trains "
        f"{sz['tokens_after_base']:,} tokens: " + ", ".join(
            f"{name} {tokens:,}" for name, tokens in sz["phase_tokens"].items()) +
        f" (sequence {sz['seq_length']}, then {sz['long_seq_length']} with RoPE base "
        f"{sz['long_rotary_base']:,.0f}; Thai {100 * sz['thai_share']:.0f}% in phases 2-3).", ""]
    lines += ["### Checks (function preservation)", "", _table(
        ["check", "value", "limit", "passed"],
        [[c["name"], f"{c['value']:.2e}", f"{c['limit']:.0e}", "yes" if c["passed"] else "**no**"]
         for c in report["checks"]]), ""]
    lines += ["### Hypotheses", "", _table(
        ["", "claim", "measured", "holds"],
        [[h["id"], h["claim"], h["measured"], "yes" if h["holds"] else "**no**"]
         for h in report["hypotheses"]]), ""]
    rows = []
    for key, label in MODEL_ORDER:
        name = key.format(s=s1)
        if name in report["models"]:
            b = report["models"][name]
            rows.append([label, b.get("thai_valid"), b.get("english_valid"), b.get("ntrex_tha"),
                         b.get("ntrex_eng")])
    lines += ["### Bits per character of every stage's model (HF exports, short context)", "",
              _table(["model", "Thai valid", "English valid", "NTREX Thai", "NTREX English"], rows),
              ""]
    cmp_rows = []
    for arm, label in ARM_LABELS.items():
        th, en = report["comparison"]["thai_valid"][arm], report["comparison"]["english_valid"][arm]
        cmp_rows.append([label, " / ".join(f"{v:.4f}" for v in th["seeds"]),
                         f"{th['mean']:.4f} ± {th['spread']:.4f}",
                         " / ".join(f"{v:.4f}" for v in en["seeds"]),
                         f"{en['mean']:.4f} ± {en['spread']:.4f}"])
    lines += ["### JAI against the controls (same tokens after the base)", "", _table(
        ["arm", "Thai valid per seed", "Thai mean ± half range", "English valid per seed",
         "English mean ± half range"], cmp_rows), ""]
    ld = report["long_documents"]
    lines += ["### Long documents", "", _table(["model", "context", "bits/char", "documents"], [
        [v["model"], v["context"], v["bits_per_char"], v["documents"]] for v in ld.values()]), ""]
    pt = report["post_training"]
    lines += ["### Post-training", "", _table(
        ["model", "iApp exact match", "iApp F1", "items (skipped: too long)",
         "iApp answer loss (nats/token)"],
        [[name, v["exact_match"], v["f1"], f"{v['items']} ({v['skipped'] or 0})", v["answer_loss"]]
         for name, v in pt["iapp"].items()]), "",
        "DPO held-out accuracy: " + ", ".join(
            f"{lang} {h['accuracy']:.3f} ({h['pairs']} pairs)"
            for lang, h in pt["dpo_heldout"].items()) +
        f"; all {_fmt(pt['dpo_heldout_accuracy'], 3)}.", ""]
    t = report["tokens_per_char"]
    lines += ["### Tokens per character (NTREX-128)", "", _table(
        ["tokenizer", "Thai", "English"],
        [[k, v["thai"]["tokens_per_char"], v["english"]["tokens_per_char"]] for k, v in t.items()]),
        ""]
    groups: Dict[str, list] = {}
    for st in report["stages"]:
        g = groups.setdefault(stage_group(st["stage"]), [0, 0.0, 0.0])
        g[0] += 1
        g[1] += st["seconds"]
        g[2] += st["cpu_seconds"]
    lines += ["### Time", "", _table(["stages", "count", "wall minutes", "CPU minutes"], [
        [name, n, f"{wall / 60:.1f}", f"{cpu / 60:.1f}"] for name, (n, wall, cpu) in groups.items()]),
        ""]
    lines += ["### Plots", "", f"![bits per character against tokens](images/{IMAGES['curves']})", "",
              f"![expert load per layer](images/{IMAGES['router']})", ""]
    lines += [f"Final model: `final_hf/` (NTREX Thai bits/char "
              f"{report['final']['bits_per_char']['ntrex_tha']:.4f}).", ""]
    return "\n".join(lines)


def summary(report: dict, rows: List[tuple]) -> str:
    lines = ["", f"{'stage':<28} {'':>5} {'seconds':>8}"]
    lines += [f"{name:<28} {status:>5} {seconds:8.1f}" for name, status, seconds in rows]
    lines += ["", "checks:"]
    lines += [f"  {'PASS' if c['passed'] else 'FAIL'}  {c['value']:.2e} <= {c['limit']:.0e}  "
              f"{c['name']}" for c in report["checks"]]
    lines += ["hypotheses:"]
    lines += [f"  {h['id']} {'holds' if h['holds'] else 'does not hold'}: {h['measured']}"
              for h in report["hypotheses"]]
    return "\n".join(lines)


def plot_curves(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sz = report["sizes"]
    bounds = []
    for tokens in sz["phase_tokens"].values():
        bounds.append((bounds[-1] if bounds else 0) + tokens)
    colors = {"jai": "tab:red", "control-a": "tab:blue", "control-b": "tab:green"}
    for ax, key, title in ((axes[0], "thai_valid", "Thai valid bits/char"),
                           (axes[1], "english_valid", "English valid bits/char")):
        for arm, label in ARM_LABELS.items():
            pts = sorted((p["tokens"], p["bits_per_char"][key]) for p in report["curves"]
                         if p["arm"] == arm and key in p["bits_per_char"])
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[arm], label=f"{label}, seed "
                        f"{report['seeds'][0]}")
            finals = report["comparison"][key][arm]["seeds"][1:]
            if finals:
                ax.scatter([sz["tokens_after_base"]] * len(finals), finals, marker="x", s=60,
                           color=colors[arm], label=f"{label}, other seeds")
        values = [p["bits_per_char"][key] for p in report["curves"] if key in p["bits_per_char"]]
        lo, hi = min(values), max(values)
        base = report["models"]["base"][key]
        if lo - (hi - lo) <= base <= hi + (hi - lo):
            ax.axhline(base, color="gray", linestyle=":", label="base model")
            title += f" (base model {base:.2f})"
        else:
            title += f" (base model {base:.2f}, off the axis)"
        for b in bounds[:-1]:
            ax.axvline(b, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"{title}", fontsize=10)
        ax.set_xlabel("tokens after the base model (phases: English, Thai 27%, long context)")
        ax.set_ylabel("bits / character")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_router(report: dict, path: str) -> None:
    """Expert load per layer (share of the routed tokens) of the final JAI checkpoint on Thai and
    English validation text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jai = [p for p in report["curves"] if p["arm"] == "jai" and p.get("expert_load")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    if jai:
        last = max(jai, key=lambda p: p["step"])
        for ax, key, title in ((axes[0], "thai_valid", "Thai"), (axes[1], "english_valid", "English")):
            load = last["expert_load"].get(key) or []
            layers = range(len(load))
            bottom = [0.0] * len(load)
            for e in range(len(load[0]) if load else 0):
                share = [row[e] for row in load]
                ax.bar(layers, share, bottom=bottom, label=f"expert {e}")
                bottom = [b + s for b, s in zip(bottom, share)]
            ax.set_title(f"expert load per layer, {title} valid (JAI, step {last['step']})")
            ax.set_xlabel("layer")
        axes[0].set_ylabel("share of the routed tokens")
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
