#!/usr/bin/env python3
"""One-setting-at-a-time ablations from one base config (stdlib only).

Each --grid KEY=V1,V2,... adds one run per value with only KEY changed from the base (the base
itself runs once per seed); --seeds repeats every run with train.seed (and data order) changed,
so noise can be told from effect. Every run gets --set overrides common to all (--set), trains
with `tern train`, and the results go to OUT/results.csv, OUT/results.md (mean and spread over
seeds) and OUT/val_curves.png (`tern plot`).

    python3 scripts/ablate.py --config configs/tiny.toml --out runs/ablate --steps 100 \\
        --seeds 0,1 --grid model.group_size=64,256 --grid model.scale=max_abs
"""
import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

TERN = Path(__file__).resolve().parent.parent / "target" / "release" / "tern"


def toml_value(v):
    """A --set value as TOML: numbers and booleans as they are, anything else quoted."""
    if v in ("true", "false"):
        return v
    try:
        float(v)
        return v
    except ValueError:
        return json.dumps(v)


def key_value(flag, text):
    """KEY=VALUE of a --set or --grid argument, or exit naming the bad argument."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        sys.exit(f"error: {flag} '{text}': expected KEY=VALUE (e.g. model.group_size=64)")
    return key, value


def seed_list(flag, text):
    """Comma-separated integer seeds, or exit naming the bad argument."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        sys.exit(f"error: {flag} '{text}': expected comma-separated integers (e.g. 0,1)")


def run(cfg, out, name, seed, sets, steps, every):
    run_dir = out / f"{name}-seed{seed}"
    summary = run_dir / "summary.json"
    if summary.exists():
        print(f"  {run_dir.name}: done before, reusing", flush=True)
    else:
        cmd = [str(TERN), "train", "--config", cfg, "--quiet",
               "--set", f"train.steps={steps}", "--set", f"train.seed={seed}", "--set", f"data.seed={seed}",
               "--set", f"eval.every={every}", "--set", f"train.out_dir={json.dumps(str(run_dir))}"]
        for k, v in sets:
            cmd += ["--set", f"{k}={toml_value(v)}"]
        print("  " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"run {run_dir.name} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    s = json.loads(summary.read_text())
    return {
        "run": name, "seed": seed, "changed": " ".join(f"{k}={v}" for k, v in sets) or "(base)",
        "train_loss_last10": s["train_loss_last10_mean"], "val_loss": s["val_loss"], "val_ppl": s["val_ppl"],
        "tokens_per_s": s["tokens_per_sec"],
        # a full-precision run's check projects its latent weights; that is not the model it ran
        "share_zero": (s.get("ternary_check") or {}).get("share_zero") if s.get("ternary", True) else None,
        "dir": str(run_dir),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25, help="evaluate every this many steps")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--base-seeds", default=None, help="seeds for the base run (default: --seeds)")
    ap.add_argument("--grid", action="append", default=[], help="KEY=V1,V2 (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="KEY=V for every run (repeatable)")
    ap.add_argument("--name", default="base", help="name of the base run")
    a = ap.parse_args()
    if not TERN.exists():
        sys.exit(f"{TERN} not found: run `cargo build --release` first")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [key_value("--set", s) for s in a.set]
    seeds = seed_list("--seeds", a.seeds)
    base_seeds = seed_list("--base-seeds", a.base_seeds or a.seeds)
    plan = [(a.name, common, base_seeds)]
    for g in a.grid:
        key, values = key_value("--grid", g)
        for v in values.split(","):
            plan.append((f"{key.split('.')[-1]}={v}", common + [(key, v)], seeds))
    rows = []
    for name, sets, ss in plan:
        for seed in ss:
            rows.append(run(a.config, out, name, seed, sets, a.steps, a.every))
    base_seed_val = {r["seed"]: r["val_loss"] for r in rows if r["run"] == a.name}
    for r in rows:
        b = base_seed_val.get(r["seed"])
        r["val_loss_minus_base_same_seed"] = None if b is None else r["val_loss"] - b
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    lines = ["| run | seeds | final train loss (last 10) | val loss (mean vs base mean) | val loss - base, per seed "
             "| val PPL | tokens/s | share of zeros |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    by_run = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    base_val = statistics.mean(r["val_loss"] for r in by_run[a.name])

    def paired(rs):
        """Each seed's val loss minus the base's with the same seed (same init and data order),
        which removes most of the seed-to-seed noise from the comparison."""
        ds = [f"{r['val_loss_minus_base_same_seed']:+.4f}" for r in rs if r["val_loss_minus_base_same_seed"] is not None]
        return " / ".join(ds) or "-"

    for name, rs in by_run.items():
        def cell(key, fmt):
            vals = [r[key] for r in rs if r[key] is not None]
            if not vals:
                return "-"
            m = statistics.mean(vals)
            return (fmt % m) + (f" ± {(max(vals) - min(vals)) / 2:{fmt[1:]}}" if len(vals) > 1 else "")
        delta = statistics.mean(r["val_loss"] for r in rs) - base_val
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {cell('train_loss_last10', '%.4f')} | "
                     f"{cell('val_loss', '%.4f')} ({delta:+.4f}) | {paired(rs)} | {cell('val_ppl', '%.1f')} | "
                     f"{cell('tokens_per_s', '%.0f')} | "
                     f"{cell('share_zero', '%.3f')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot = [str(TERN), "plot", "--out", str(out / "val_curves.png"), "--title", "ablations: validation loss"]
    for r in rows:
        if r["seed"] == rows[0]["seed"] or len(by_run[r["run"]]) == 1:
            plot += ["--run", f"{r['run'].replace('=', ':')}={r['dir']}"]
    subprocess.run(plot, check=True)


if __name__ == "__main__":
    main()
