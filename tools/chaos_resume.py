#!/usr/bin/env python
"""Kill a training run at random, resume it, and check that nothing was lost.

    python tools/chaos_resume.py --config run.yaml --kills 20 [--seed S] [--nproc 2]
    python tools/chaos_resume.py --config run.yaml --kills 5 -- --pp 2 --train-iters 40

The config is a ``pretrain_jai.py`` YAML (any TP/PP/EP that ``--nproc`` processes hold; flags
after ``--`` go to every launch). The tool first trains it uninterrupted (the reference), then
again under ``torchrun --nproc_per_node N`` with ``--load`` = ``--save``, and SIGKILLs one random
rank of each launch at a random moment: after a random step (the kills' steps are drawn uniformly
over the run and taken in order), or (half of the kills, see ``--save-share``) while the first
checkpoint written from that step on is being written, as soon as its ``iter_N.tmp`` appears. Each
kill is followed by a resume (a new launch), and after the last one the run trains to the end.

A kill is survived when the next launch resumes from a complete checkpoint, every step logged
after it has the reference's loss bit for bit, and every process the killed rank had started is
gone within 10 s. At the end the final checkpoint must equal the reference's (every tensor, the
optimizer, every rank's RNG states; only the runs' own paths differ, see
``megatron_jai/checkpoint/diff.py``). Prints a table of the kills and a summary line; exit 0 when
every kill was survived, 1 otherwise, 2 for a config that does not train uninterrupted.
The launches' logs and checkpoints are kept under ``--work`` (default: a temporary directory,
removed after a run where every kill was survived).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron_jai import cli  # noqa: E402

PRETRAIN = os.path.join(REPO_ROOT, "pretrain_jai.py")
# Settings of a launch that the tool itself sets: the only entries allowed to differ in the final
# checkpoints' common/args.
RUN_PATHS = ("load", "save", "metrics_file", "tensorboard_dir")
ORPHAN_GRACE_S = 10.0
_STEP = re.compile(r"^step\s+(\d+)\s")
_RESUMED = re.compile(r"resumed from .* at iteration (\d+)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chaos_resume.py", description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--config", required=True, help="pretrain_jai.py YAML run config")
    p.add_argument("--kills", type=int, required=True, help="SIGKILLs to deliver (>= 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the kill plan: which rank, when (the same seed, the same plan)")
    p.add_argument("--nproc", type=int, default=2, help="processes per launch (torchrun)")
    p.add_argument("--save-share", type=float, default=0.5,
                   help="share of the kills aimed at a checkpoint being written")
    p.add_argument("--work", default=None,
                   help="directory for the launches' checkpoints and logs (default: a temporary "
                        "one, removed when every kill was survived)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one launch may take before it counts as hung")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                   help="after --: flags passed to every pretrain_jai.py launch")
    return p


# ---- one launch --------------------------------------------------------------------------------
class Launch:
    """``torchrun ... pretrain_jai.py`` with its output read line by line into a log."""

    def __init__(self, name: str, cmd: list, log_path: str):
        self.name, self.log_path = name, log_path
        self.lines: list = []
        self.last_step = 0
        self.resumed_from = None
        self.started_fresh = False
        env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("OMP_NUM_THREADS", "1")
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(var, None)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.append(line)
            m = _STEP.match(line)
            if m:
                self.last_step = int(m.group(1))
            m = _RESUMED.search(line)
            if m:
                self.resumed_from = int(m.group(1))
            if "no checkpoint yet, starting a new run" in line:
                self.started_fresh = True

    def ranks(self) -> list:
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [c for c in children if _cmdline_has(c, "pretrain_jai.py")]

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        self._reader.join(timeout=30)
        self.log.close()
        return self.proc.returncode

    def stop(self) -> None:
        """Kill the launcher and its ranks (each rank is a session of its own)."""
        import psutil

        try:
            everything = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            everything = []
        for p in everything:
            _kill(p)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()

    def tail(self, n: int = 15) -> str:
        return "".join(self.lines[-n:])


def _cmdline_has(p, text: str) -> bool:
    try:
        return text in " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone or a zombie: not a rank
        return False


def _kill(p) -> None:
    try:
        p.kill()
    except Exception:  # noqa: BLE001 - already gone
        pass


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_metrics(path: str) -> dict:
    """step -> loss of a launch's metrics file (the last record of a step wins)."""
    losses = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by the kill
                if "step" in record and "loss" in record and not record.get("eval_only"):
                    losses[int(record["step"])] = record["loss"]
    return losses


def _saving(root: str, since: float) -> str | None:
    """The ``iter_N.tmp`` being written: made after ``since`` (a killed launch's leftover is
    older; a save of the same iteration makes it anew)."""
    try:
        names = os.listdir(root)
    except OSError:
        return None
    for name in names:
        if name.startswith("iter_") and name.endswith(".tmp"):
            try:
                if os.stat(os.path.join(root, name)).st_mtime >= since:
                    return name
            except OSError:
                continue  # renamed or removed meanwhile
    return None


def _rank_of(p) -> str:
    try:
        return p.environ().get("RANK", "?")
    except Exception:  # noqa: BLE001 - gone already
        return "?"


def _tracked(root: str):
    """The iteration the tracker names (None before the first save); imported here so that
    ``--help`` stays free of torch."""
    from megatron_jai.checkpoint.dist import latest_iteration

    return latest_iteration(root)


# ---- the run -----------------------------------------------------------------------------------
class Chaos:
    def __init__(self, args, work: str):
        self.args, self.work = args, work
        self.rng = random.Random(args.seed)
        self.extra = [a for a in args.pretrain_args if a != "--"] if args.pretrain_args else []
        config = cli.read_yaml(args.config, cli.UserError)
        self.tensorboard = bool(config.get("tensorboard_dir") or config.get("tensorboard-dir"))
        self.launches = 0

    def command(self, name: str, root: str) -> tuple:
        metrics = os.path.join(self.work, "metrics", f"{name}.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run",
               f"--nproc_per_node={self.args.nproc}", f"--master_port={_free_port()}",
               PRETRAIN, "--config", os.path.abspath(self.args.config), *self.extra,
               "--save", root, "--load", root, "--metrics-file", metrics]
        if self.tensorboard:
            cmd += ["--tensorboard-dir", os.path.join(self.work, "tensorboard", name)]
        return cmd, metrics

    def launch(self, name: str, root: str) -> tuple:
        cmd, metrics = self.command(name, root)
        self.launches += 1
        self.current = Launch(name, cmd, os.path.join(self.work, "logs", f"{name}.log"))
        return self.current, metrics

    def stop_current(self) -> None:
        """Interrupted (Ctrl-C, SIGTERM): the launch in flight goes too."""
        current = getattr(self, "current", None)
        if current is not None and current.proc.poll() is None:
            current.stop()

    def reference(self) -> tuple:
        root = os.path.join(self.work, "reference")
        run, metrics = self.launch("reference", root)
        rc = run.wait(self.args.timeout)
        final = _tracked(root)
        if rc != 0 or final is None:
            raise cli.UserError(f"the uninterrupted run of {self.args.config} failed (exit {rc}; "
                                f"log {run.log_path}): {run.tail(3).strip().splitlines()[-1:]}")
        return root, final, _read_metrics(metrics)

    def kill_one(self, index: int, root: str, total_steps: int) -> dict:
        """One launch (resuming from ``root``) and its kill. Returns the kill's record."""
        aim_save = self.rng.random() < self.args.save_share
        # The plan's steps are sorted: the kills spread over the whole run (early, late, across
        # phase boundaries); one the resume point has passed lands right after the restart.
        start = min((_tracked(root) or 0) + 1, total_steps)
        target = max(start, self.plan(total_steps)[index - 1])
        if not aim_save and target >= total_steps - 1:
            aim_save = True  # near the end only the last save is sure to be hit
        delay = self.rng.uniform(0.0, 0.5)
        launched = time.time() - 1.0  # (filesystem timestamps may be coarse)
        run, metrics = self.launch(f"kill{index:02d}", root)
        record = {"kill": index, "aim": "save" if aim_save else "step", "target": target,
                  "rank": None, "moment": "", "run": run, "metrics": metrics, "orphans": 0}
        deadline = time.time() + self.args.timeout
        victim = None
        seen_step_at = None
        while time.time() < deadline and run.proc.poll() is None:
            ranks = run.ranks()
            if run.last_step >= total_steps and not aim_save:
                aim_save = True  # the last step is done: its save is the last moment to hit
                record["aim"] = "save"
            if run.last_step >= target and len(ranks) == self.args.nproc:
                tmp = _saving(root, launched)
                if aim_save and tmp:
                    victim, record["moment"] = self.rng.choice(ranks), f"writing {tmp}"
                elif not aim_save:
                    seen_step_at = seen_step_at or time.time()
                    if time.time() - seen_step_at >= delay:
                        victim = self.rng.choice(ranks)
                        record["moment"] = f"after step {run.last_step}" + (
                            f", writing {tmp}" if tmp else "")
                if victim is not None:
                    try:
                        helpers = victim.children(recursive=True)
                    except Exception:  # noqa: BLE001 - the rank died on its own meanwhile
                        helpers = []
                    record["rank"] = _rank_of(victim)
                    _kill(victim)
                    break
            time.sleep(0.005)
        if victim is None:
            record["moment"] = "the launch ended first"
        rc = run.wait(max(60.0, deadline - time.time()))
        record["rc"] = rc
        record["tracked_after"] = _tracked(root)
        if victim is not None:
            grace = time.time() + ORPHAN_GRACE_S
            while time.time() < grace and any(_alive(p) for p in helpers):
                time.sleep(0.1)
            left = [p for p in helpers if _alive(p)]
            record["orphans"] = len(left)
            for p in left:
                _kill(p)
        return record

    def plan(self, total_steps: int) -> list:
        """The step after which each kill is aimed: uniform over the run, sorted."""
        if not hasattr(self, "_plan"):
            self._plan = sorted(self.rng.randint(1, total_steps) for _ in range(self.args.kills))
        return self._plan

    def finish(self, name: str, root: str) -> tuple:
        run, metrics = self.launch(name, root)
        rc = run.wait(self.args.timeout)
        return run, metrics, rc


def _resume_ok(run: Launch, tracked) -> bool:
    """The launch after a kill resumed from the checkpoint the tracker named after the kill (or,
    with none yet, started a new run)."""
    return run.resumed_from == tracked if tracked is not None else run.started_fresh


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.kills < 1:
        raise cli.UserError(f"--kills must be >= 1, got {args.kills}")
    if args.nproc < 1:
        raise cli.UserError(f"--nproc must be >= 1, got {args.nproc}")
    if not 0 <= args.save_share <= 1:
        raise cli.UserError(f"--save-share must be in [0, 1], got {args.save_share}")
    if not os.path.isfile(args.config):
        raise cli.UserError(f"config {args.config} does not exist")
    work = args.work or tempfile.mkdtemp(prefix="chaos_resume_")
    if args.work:
        if os.path.exists(work) and os.listdir(work):
            raise cli.UserError(f"--work {work} is not empty (the chaos run starts from nothing)")
    for sub in ("logs", "metrics"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    chaos = Chaos(args, work)
    try:
        return _run(chaos, args, work)
    except BaseException:
        chaos.stop_current()
        raise


def _run(chaos: Chaos, args, work: str) -> int:
    t0 = time.time()
    print(f"chaos_resume: uninterrupted reference run of {args.config} ({args.nproc} processes)",
          flush=True)
    ref_root, final_iteration, ref_losses = chaos.reference()
    total_steps = max(ref_losses) if ref_losses else final_iteration
    print(f"reference: {len(ref_losses)} steps to iteration {final_iteration} in "
          f"{time.time() - t0:.0f} s; now {args.kills} kills (seed {args.seed})", flush=True)

    root = os.path.join(work, "chaos")
    kills = []
    bar = cli.progress(total=args.kills, desc="kills", unit="kill", enabled=args.progress)
    for index in range(1, args.kills + 1):
        kills.append(chaos.kill_one(index, root, total_steps))
        bar.update(1)
    bar.close()
    last_run, last_metrics, last_rc = chaos.finish("final", root)

    # Each kill is judged by the launch that follows it (the next kill's, or the final one).
    launches = [(k["run"], k["metrics"]) for k in kills] + [(last_run, last_metrics)]
    for i, k in enumerate(kills):
        following, metrics = launches[i + 1]
        steps = _read_metrics(metrics)
        wrong = [s for s, loss in steps.items() if ref_losses.get(s) != loss]
        k["resumed"] = (f"iteration {following.resumed_from}" if following.resumed_from is not None
                        else "start" if following.started_fresh else "failed")
        k["checked_steps"] = len(steps)
        problems = []
        if k["rank"] is None:  # nothing to survive: the run was already complete
            k["problems"] = []
            continue
        if not _resume_ok(following, k["tracked_after"]):
            problems.append(f"no resume (log {following.log_path})")
        if wrong:
            problems.append(f"loss differs at steps {wrong[:5]}")
        if k["orphans"]:
            problems.append(f"{k['orphans']} orphaned process(es)")
        k["problems"] = problems
    # The steps the killed launches logged before their kill must match too.
    for k in kills:
        wrong = [s for s, loss in _read_metrics(k["metrics"]).items()
                 if ref_losses.get(s) != loss]
        if wrong:
            k["problems"].append(f"loss differs at steps {wrong[:5]} (before the kill)")

    final_problems = []
    if last_rc != 0:
        final_problems.append(f"the final launch failed (exit {last_rc}; log {last_run.log_path})")
    chaos_final = _tracked(root)
    if chaos_final != final_iteration:
        final_problems.append(f"the run ended at iteration {chaos_final}, the reference at "
                              f"{final_iteration}")
    else:
        from megatron_jai.checkpoint.diff import diff_iterations

        it = f"iter_{final_iteration:07d}"
        differences = diff_iterations(os.path.join(ref_root, it), os.path.join(root, it),
                                      ignore=[f"common/args/{k}" for k in RUN_PATHS])
        if differences:
            final_problems.append(f"the final checkpoint differs from the reference's in "
                                  f"{len(differences)} place(s), first {differences[0]}")

    _print_table(kills)
    delivered = [k for k in kills if k["rank"] is not None]
    survived = sum(1 for k in delivered if not k["problems"]) if not final_problems else 0
    during_save = sum(1 for k in delivered if "writing" in k["moment"])
    for line in final_problems:
        print(f"FAILED: {line}")
    ok = bool(delivered) and survived == len(delivered)
    print(f"chaos_resume: kills survived {survived}/{len(delivered)} ({len(kills)} planned, "
          f"{during_save} during a save); final checkpoint (iteration {final_iteration}) "
          + ("equals the uninterrupted run's" if not final_problems else "NOT verified")
          + f"; {chaos.launches} launches in {time.time() - t0:.0f} s"
          + ("" if ok else f"; logs and checkpoints kept in {work}"), flush=True)
    if ok and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _print_table(kills: list) -> None:
    print(f"{'kill':>4}  {'aim':<4}  {'rank':>4}  {'moment':<40}  {'resumed from':<14}  "
          f"{'steps':>5}  result")
    for k in kills:
        rank = "-" if k["rank"] is None else str(k["rank"])
        result = "not delivered" if k["rank"] is None else "ok" if not k["problems"] else \
            "FAILED: " + "; ".join(k["problems"])
        print(f"{k['kill']:>4}  {k['aim']:<4}  {rank:>4}  {k['moment'][:40]:<40}  "
              f"{k.get('resumed', ''):<14}  {k.get('checked_steps', 0):>5}  {result}")


if __name__ == "__main__":
    sys.exit(cli.run("chaos_resume.py", main))
