#!/usr/bin/env python3
"""Writes run.sh's summary: one JSON object on stdout from the steps' outputs.

Reads OUT/steps.tsv (step, exit, seconds, note), each step's last JSON line in
OUT/<step>.out, the run folders' metrics.jsonl under OUT/runs and OUT/gpu.txt.
Only the standard library: it runs in whatever Python the node has.
"""
import argparse
import json
import os


def last_json(path):
    """The last line of a file that parses as a JSON object, else None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def last_line(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [l.strip() for l in f.read().splitlines() if l.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None


def metrics(run_dir):
    """The last epoch and eval events of a run folder's metrics.jsonl."""
    found = {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                if v.get("event") in ("epoch", "eval"):
                    found[v["event"]] = v
    except OSError:
        pass
    return found


def ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


def training_run(out, name):
    m = metrics(os.path.join(out, "runs", name))
    epoch, ev = m.get("epoch", {}), m.get("eval", {})
    return {
        "epoch_seconds": epoch.get("epoch_seconds"),
        "train_peak_device_bytes": epoch.get("train_peak_device_bytes"),
        "train_peak_rss_bytes": epoch.get("train_peak_rss_bytes"),
        "eval_seconds": ev.get("seconds"),
        "test_acc": ev.get("test_acc"),
        "test_acc_se": ev.get("test_acc_se"),
        "test_acc_runs": ev.get("test_acc_runs"),
        "test_acc_deterministic": ev.get("test_acc_deterministic"),
        "train_acc": ev.get("train_acc"),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--quick", default="0")
    p.add_argument("--missing", default="")
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--budget", type=int, default=0)
    a = p.parse_args()
    out = a.out

    steps = {}
    with open(os.path.join(out, "steps.tsv"), encoding="utf-8") as f:
        next(f, None)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            name, code, secs = parts[0], parts[1], parts[2]
            note = parts[3] if len(parts) > 3 else ""
            entry = {
                "exit": None if code == "-" else int(code),
                "seconds": float(secs),
                "ok": code == "0",
            }
            if note:
                entry["note"] = note
            if code not in ("-", "0"):
                entry["last_stderr"] = last_line(os.path.join(out, name + ".log"))
            steps[name] = entry

    selftest = last_json(os.path.join(out, "selftest.out"))
    if selftest is not None:
        checks = selftest.get("checks", [])
        steps.setdefault("selftest", {})["result"] = {
            "device": selftest.get("device"),
            "checks": len(checks),
            "failed": [c.get("check") for c in checks if not c.get("ok")],
            "worst": max((c.get("max_rel_diff") or 0.0 for c in checks), default=None),
        }

    runs = {name: training_run(out, name) for name in ("dt", "ct", "fm")
            if os.path.isdir(os.path.join(out, "runs", name))}
    bench = last_json(os.path.join(out, "bench.out")) or {}
    torch_step = last_json(os.path.join(out, "torch-step.out")) or {}
    torch_dt = last_json(os.path.join(out, "torch-dt.out")) or {}

    noprop_fig = {
        "block_step_ms": bench.get("block_step_ms"),
        "fused_step_ms_per_block": bench.get("fused_step_ms_per_block"),
        "infer_T10_images_per_s": bench.get("infer_images_per_s"),
        "dt_epoch_seconds": runs.get("dt", {}).get("epoch_seconds"),
        "dt_test_acc": runs.get("dt", {}).get("test_acc"),
        "dt_test_acc_deterministic": runs.get("dt", {}).get("test_acc_deterministic"),
        "dt_train_peak_device_bytes": runs.get("dt", {}).get("train_peak_device_bytes"),
    }
    torch_fig = {
        "version": torch_step.get("torch") or torch_dt.get("torch"),
        "block_step_ms": torch_step.get("train_step_ms_median"),
        "infer_T10_images_per_s": torch_step.get("infer_T10_images_per_s"),
        # torch_reference's clock runs through one stochastic evaluation of
        # the test set after the epoch; noprop's epoch_seconds does not.
        "dt_epoch_plus_one_eval_seconds": torch_dt.get("train_s"),
        "dt_test_acc": torch_dt.get("test_acc"),
        "dt_test_acc_deterministic": torch_dt.get("test_acc_deterministic"),
    }
    # noprop's epoch plus one stochastic test run: its evaluation stacks the
    # runs (5 stochastic + deterministic), so one run costs about a sixth.
    dt = runs.get("dt", {})
    noprop_epoch_plus_one_eval = None
    if isinstance(dt.get("epoch_seconds"), (int, float)) and isinstance(dt.get("eval_seconds"), (int, float)):
        runs_made = len(dt.get("test_acc_runs") or []) + (dt.get("test_acc_deterministic") is not None)
        noprop_epoch_plus_one_eval = round(dt["epoch_seconds"] + dt["eval_seconds"] / max(runs_made, 1), 2)
    noprop_fig["dt_epoch_plus_one_eval_seconds"] = noprop_epoch_plus_one_eval
    # Below 1 means noprop takes less time (or, for throughput, is slower).
    ratios = {
        "block_step_time_noprop_over_torch": ratio(noprop_fig["block_step_ms"], torch_fig["block_step_ms"]),
        "dt_epoch_time_noprop_over_torch": ratio(noprop_epoch_plus_one_eval, torch_fig["dt_epoch_plus_one_eval_seconds"]),
        "infer_throughput_noprop_over_torch": ratio(noprop_fig["infer_T10_images_per_s"],
                                                    torch_fig["infer_T10_images_per_s"]),
    }
    gpu = last_line(os.path.join(out, "gpu.txt"))
    summary = {
        "device": a.device,
        "gpu": gpu,
        "quick": a.quick == "1",
        "seconds": a.seconds,
        "budget_seconds": a.budget,
        "unloadable_libraries": a.missing.split() or None,
        "all_ok": not a.missing.split() and all(s["ok"] or s["exit"] is None for s in steps.values()),
        "steps": steps,
        "noprop": noprop_fig,
        "torch": torch_fig,
        "ratios": ratios,
        "runs": runs,
        "bench": bench or None,
    }
    print(json.dumps(summary, indent=1, sort_keys=False))


if __name__ == "__main__":
    main()
