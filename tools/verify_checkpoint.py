#!/usr/bin/env python
"""Check checkpoint iterations against their manifests (each file's size and CRC32) without
loading a model: what training, the merge, the export, upscale.py, generate and evaluate do before
they read a checkpoint.

Examples:
  python tools/verify_checkpoint.py runs/jai/checkpoints               # the tracked iteration
  python tools/verify_checkpoint.py runs/jai/checkpoints --iteration 4000
  python tools/verify_checkpoint.py runs/jai/checkpoints --all         # every complete iteration

Exit 0 when everything checked verifies (iterations saved before manifests existed are listed as
unverified, with a note), 2 with one line naming the file and what is wrong otherwise.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_jai import cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("root", metavar="ROOT", help="checkpoint root (or one of its iter_* directories)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, default=None,
                       help="the iteration to check (default: the tracked one)")
    which.add_argument("--all", action="store_true", help="check every complete iteration")
    p.add_argument("--threads", type=int, default=None,
                   help="files checksummed at once (default: min(8, CPUs))")
    return p.parse_args(argv)


def _targets(args) -> tuple:
    from megatron_jai.checkpoint import dist as dist_ckpt
    from megatron_jai.checkpoint import manifest

    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        raise cli.UserError(f"{root} does not exist")
    name = os.path.basename(root)
    if manifest.ITER_DIR.match(name) and args.iteration is None and not args.all:
        return os.path.dirname(root), [int(name[5:])]
    if args.all:
        found = dist_ckpt.complete_iterations(root)
        if not found:
            raise cli.UserError(f"{root} holds no complete iteration (no iter_NNNNNNN directory)")
        return root, found
    if args.iteration is not None:
        if not os.path.isdir(dist_ckpt.iteration_dir(root, args.iteration)):
            raise cli.UserError(f"{root} has no iteration {args.iteration} (complete: "
                                f"{dist_ckpt.complete_iterations(root) or 'none'})")
        return root, [args.iteration]
    tracked = dist_ckpt.latest_iteration(root)
    if tracked is None:
        found = dist_ckpt.complete_iterations(root)
        if not found:
            raise cli.UserError(f"{root} is not a checkpoint root (no "
                                f"{dist_ckpt.TRACKER_FILE}, no iteration directory)")
        raise cli.UserError(f"{os.path.join(root, dist_ckpt.TRACKER_FILE)} is missing; "
                            f"{dist_ckpt.suggest_iteration(root)}")
    return root, [tracked]


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_jai.checkpoint import manifest

    if args.threads is not None and args.threads < 1:
        raise cli.UserError(f"--threads must be >= 1, got {args.threads}")
    root, its = _targets(args)
    share = (lambda directory, names: manifest.checksum(directory, names, args.threads))
    start = time.perf_counter()
    ok, unverified, failed, nbytes = [], [], [], 0
    for it in cli.progress(its, desc="verify", unit="iteration", enabled=len(its) > 1):
        directory = manifest.iteration_dir(root, it)
        verdict = manifest.check(directory, share)
        if verdict.ok:
            ok.append(it)
            nbytes += sum(os.path.getsize(os.path.join(directory, n))
                          for n in manifest.list_files(directory))
            print(f"iter_{it:07d}: ok")
        elif verdict.unverified:
            unverified.append(it)
            print(f"iter_{it:07d}: note: no {manifest.MANIFEST_FILE} (saved before checkpoints "
                  f"had manifests); not verified")
        else:
            failed.append((it, verdict.problem))
            print(f"iter_{it:07d}: FAILED: {verdict.problem}")
    seconds = time.perf_counter() - start
    print(f"summary: {len(its)} iteration(s) of {root}: {len(ok)} verified "
          f"({nbytes / 1e6:,.1f} MB in {seconds:.2f} s), {len(unverified)} without a manifest, "
          f"{len(failed)} failed")
    if failed:
        it, problem = failed[-1]  # the newest failure: the one a resume would hit
        raise manifest.CheckpointIntegrityError(
            f"{problem}; {manifest.way_out(root, it, manifest.resume_hint, share)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("verify_checkpoint.py", main))
