"""Markdown tables of the benchmark JSON files, for ``docs/performance.md``.

``write_block(path, mode, run_record, results_dir)`` replaces the text between
``<!-- BEGIN {mode} -->`` and ``<!-- END {mode} -->`` (appending the block when absent)
and leaves everything else in the file as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["render_block", "write_block"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _machine(record: dict) -> str:
    m = record["machine"]
    gpu = f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB, SM {m.get('gpu_capability')})" if m.get("gpu") else "none"
    return (
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m.get('memory_gib', '?')} GiB; GPU: {gpu}; "
        f"torch {m['torch']} (CUDA {m['cuda']}), flwr {m['flwr']}, NATTEN {m['natten']} "
        f"(CUDA kernels: {'yes' if m['natten_cuda_kernels'] else 'no'}), ray {m['ray']}; "
        f"load average {m['load_avg_1m']:.1f} at start, {m.get('load_avg_1m_at_end', float('nan')):.1f} at end; "
        f"{m['date']}."
    )


def _attention(data: dict) -> str:
    c = data["config"]
    rows = []
    for r in data["results"]:
        size = f"{r['size']}x{r['size']} d{r['dilation']}"
        if not r["ok"]:
            rows.append([size, r["method"], "n/a", "", "", "", r["error"][:80]])
            continue
        ratio = f"{r['time_ratio']:.2f}" if r.get("time_ratio") is not None else ""
        rows.append([size, r["method"], f"{r['median_s'] * 1e3:.2f}", f"{r['peak_bytes'] / 2**20:.1f}", ratio,
                     r.get("auto_picks", ""), ""])
    return (f"Neighborhood attention, {c['device']}: batch {c['batch']}, {c['heads']} heads, dim {c['dim']}, kernel "
            f"{c['kernel_size']}, threads {c['threads'] or 'default'}; {data['time_measure']}; memory: "
            f"{data['memory_measure']}.\n\n"
            + _table(["map", "method", "ms", "peak MiB", "time / gather", "auto picks", "note"], rows))


def _models(data: dict) -> str:
    rows = []
    for r in data["results"]:
        knobs = ", ".join(k for k, on in (("channels-last", r["channels_last"]), ("compile", r["compile"])) if on)
        head = [r["model"], str(r["img_size"]), str(r["batch"]), r["mode"], r["precision"] + (f", {knobs}" if knobs
                                                                                              else "")]
        if not r["ok"]:
            rows.append(head + ["n/a", "", "", r["error"][:80]])
            continue
        note = f"compile {r['compile_s']:.0f} s" if r.get("compile_s") else ""
        rows.append(head + [f"{r['images_per_s']:.1f}", f"{r['peak_bytes'] / 2**20:.0f}", f"{r['params_m']:.2f}",
                            note])
    return (f"Models, {data['config']['device']}: images/s = batch / median step (train: forward, loss, backward, "
            f"AdamW step; infer: forward, eval mode); peak memory: {data['memory_measure']}.\n\n"
            + _table(["model", "px", "batch", "mode", "precision / knobs", "images/s", "peak MiB", "params M", "note"],
                     rows))


def _federation(data: dict) -> str:
    s = data["settings"]
    rows = []
    for path, r in data["results"].items():
        target = ""
        if "meets_target" in r:
            target = f"<= {r['target_ratio_total']}x: {'met' if r['meets_target'] else 'missed'}"
        cpu = "-" if r.get("cpu_s") is None else f"{r['cpu_s']:.1f}"
        cpu_ratio = "-" if r.get("ratio_cpu") is None else f"{r['ratio_cpu']:.2f}"
        load = "-" if not r.get("load_avg_1m") else "{:.1f} / {:.1f}".format(*r["load_avg_1m"])
        plain = "-" if r.get("plain_total_s") is None else f"{r['plain_total_s']:.1f}"
        rows.append([path, f"{r['total_s']:.1f}", plain, f"{r['startup_s']:.1f}", f"{r['round_s'][0]:.2f}",
                     f"{r['steady_round_s']:.2f}", f"{r['teardown_s']:.1f}", f"{r['fixed_s']:.1f}",
                     f"{r['ratio_total']:.2f}", cpu, cpu_ratio, load, target])
    preset = " (the default `medfed simulate`)" if data.get("preset") == "default" else ""
    return (f"Federation{preset}: {s['sites']} sites x {s['rounds']} rounds x {s['epochs']} local epochs, "
            f"{s['model']}, {s['dataset']} {s['img_size']} px, batch {s['batch_size']}, {s['device']}, "
            f"{s['cpus_per_site']} CPU per site; data: {data['data']}; identical final weights: "
            f"{data['identical_final_weights']}. Seconds; plain total = the plain loop of the row's own repeat, "
            "which x plain divides by; fixed = to round 1 + (round 1 - later round) + teardown; "
            "CPU s = CPU time of the path's process (all its work for plain and inprocess; not measured for ray, "
            "whose work runs in its actor processes); load = 1-minute load average at the path's start / end; "
            "the target is on total wall time.\n\n"
            + _table(["path", "total", "plain total", "to round 1", "round 1", "later round", "teardown", "fixed", "x plain",
                      "CPU s", "CPU x plain", "load", "target (wall)"], rows)
            + _federation_repeats(data))


def _federation_repeats(data: dict) -> str:
    if data.get("repeats", 1) <= 1:
        return ""
    per_path = "; ".join(f"{path} {', '.join(f'{x:.2f}' for x in r['ratio_total_repeats'])}"
                         for path, r in data["results"].items() if path != "plain")
    middle = "the lower middle one, with 2 repeats the better" if data["repeats"] % 2 == 0 else "the median"
    return (f"\n\nThe paths ran in turn {data['repeats']} times; each row is the repeat whose ratio to that "
            f"repeat's plain loop is {middle}. x plain per repeat: {per_path}.")


def _communication(data: dict) -> str:
    rows = [[r["model"], r["transfer_dtype"], f"{r['bytes_per_model'] / 2**20:.2f}",
             f"{r['bytes_per_round'] / 2**20:.2f}", f"{r['ratio_to_float32']:.2f}"] for r in data["bytes"]]
    text = ("Communication: bytes of one model as sent (Flower ArrayRecord payload) and per round "
            f"({data['sites']} sites; train: the global model out to each site and its update back; evaluate: the "
            "global model out again).\n\n"
            + _table(["model", "transfer dtype", "MiB / model", "MiB / round", "x float32"], rows))
    if data.get("accuracy"):
        a = data["accuracy"]
        rows = [[r["transfer_dtype"], f"{r['acc']:.4f}", f"{r['auc']:.4f}",
                 f"{r['balanced_acc']:.4f}" if "balanced_acc" in r else "-", f"{r['max_abs_weight_diff']:.2e}",
                 f"{r['total_s']:.1f}"] for r in a["results"]]
        text += (f"\n\nAccuracy effect ({a['description']}): mean over sites of the last round's test metrics, and "
                 "the largest absolute difference of the final weights from the float32 run.\n\n"
                 + _table(["transfer dtype", "test ACC", "test AUC", "balanced ACC", "max |w - w_fp32|", "seconds"], rows))
    return text


RENDERERS = {"attention": _attention, "models": _models, "federation": _federation, "communication": _communication}


def render_block(mode: str, record: dict, results_dir: Path) -> str:
    """The Markdown of one run: the command, the machine and one table per benchmark."""
    parts = [f"### `{record['command']}`", "", _machine(record),
             f"Total wall time {record['wall_time_s']:.0f} s.", ""]
    for name, status in record["benchmarks"].items():
        earlier = "; from an earlier run of this mode" if status.get("from_earlier_run") else ""
        parts.append(f"#### {name} ({status['wall_time_s']:.0f} s{earlier}; `benchmarks/results/{status['json']}`)")
        parts.append("")
        if not status["ok"]:
            parts += [f"Failed: {status['error']}", ""]
            continue
        data = json.loads((results_dir / status["json"]).read_text())
        parts += [RENDERERS[name](data), ""]
    return "\n".join(parts).rstrip() + "\n"


def write_block(path: Path, mode: str, record: dict, results_dir: Path) -> Path:
    """Replace (or append) the ``mode`` block of the Markdown file at ``path``, atomically."""
    begin, end = f"<!-- BEGIN {mode} -->", f"<!-- END {mode} -->"
    block = f"{begin}\n{render_block(mode, record, results_dir)}{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path
