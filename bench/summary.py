"""Collect bench/results/*.json into bench/results/summary.md: every figure with its target, spread and plot.

    python bench/summary.py
"""

from __future__ import annotations

import json
import sys

from report import RESULTS, compute_text, fmt_num, fmt_spread, md_table, meta_markdown, verdict

ORDER = ("p1_overhead", "p2_vs_hf", "p3_mfu", "p4_data", "p5_memory", "scaling")
TITLES = {
    "p1_overhead": "P1 framework overhead",
    "p2_vs_hf": "P2 vs Hugging Face",
    "p3_mfu": "P3 MFU",
    "p4_data": "P4 data path",
    "p5_memory": "P5 ZeRO memory (DP=2)",
    "scaling": "Scaling DP=1 vs DP=2",
}


TARGETS = {"p1_overhead": "<= 1.05", "p2_vs_hf": ">= 1.3", "p3_mfu": ">= 40 %", "p4_data": ">= 20"}


def machines_text(found: dict) -> str:
    """The summary header's machine line(s): CPU and what it computes natively (``report.compute_text``), once if
    every benchmark ran on the same, else per benchmark - the figures involving bf16 depend on it."""
    def line(meta: dict) -> str:
        return f"{meta['cpu']}, {meta['cores']} cores, GPU: {meta['gpu']}; {compute_text(meta)}"

    lines = {n: line(d["meta"]) for n, d in found.items()}
    if len(set(lines.values())) == 1:
        return f"Machine: {next(iter(lines.values()))}."
    return "Machines differ between benchmarks:\n\n" + "\n".join(f"- {TITLES[n]}: {t}" for n, t in lines.items())


def rows_for(name: str, d: dict) -> list[list[str]]:
    link = f"[{name}.md]({name}.md)"
    rows = []
    if name == "p1_overhead":
        for c in d["cases"]:
            s = c["ratio_largelm_vs_plain"]
            rows.append([TITLES[name], f"largelm / plain PyTorch step time, {c['model']} {c['precision']}",
                         fmt_spread(s), "<= 1.05", verdict(s["median"], 1.05, False), link])
    elif name == "p2_vs_hf":
        # The comparison first: largelm as it ships (train.precision: auto, resolved on the benchmark's
        # machine: bf16 where native, else fp32) against HF's GPT2LMHeadModel in a plain loop as users run it (fp32,
        # its default). Then the stricter one: HF given the same precision as largelm.
        for c in d["cases"]:
            tps = c["tokens_per_s"]
            if "as_users_run" in c:
                a = c["as_users_run"]
                s, what = a["speedup"], (f"largelm as shipped (auto = {a['largelm_precision']} on this machine) / "
                                         f"HF plain loop {a['hf_precision']} (its default)")
                hf = tps[a["hf_arm"]]
            elif "speedup_largelm_vs_hf_default" in c:  # results written before precision: auto
                s, what = c["speedup_largelm_vs_hf_default"], (f"largelm {c['precision']} (as shipped then) / HF "
                                                               "plain loop fp32 (its default)")
                hf = tps["HF transformers fp32 (default)"]
            else:
                continue
            rows.append([TITLES[name], f"as users run each: {what} tokens/s, {c['model']} "
                         f"({fmt_num(tps['largelm']['median'])} vs {fmt_num(hf['median'])})",
                         fmt_spread(s), ">= 1.3", verdict(s["median"], 1.3, True), link])
        for c in d["cases"]:
            s, tps = c["speedup_largelm_vs_hf"], c["tokens_per_s"]
            ceiling = f"; ceiling x{c['ceiling_vs_hf']:.2f}" if "ceiling_vs_hf" in c else ""
            rows.append([TITLES[name], f"stricter, HF given the same precision: largelm / HF tokens/s, {c['model']} "
                         f"{c['precision']} ({fmt_num(tps['largelm']['median'])} vs "
                         f"{fmt_num(tps['HF transformers']['median'])}{ceiling})", fmt_spread(s), ">= 1.3",
                         verdict(s["median"], 1.3, True), link])
    elif name == "p3_mfu":
        for c in d["cases"]:
            s = c["mfu"]
            rows.append([TITLES[name], f"MFU {c['precision']}, {c.get('model', 'gpt-25m')} "
                         f"({fmt_num(c['achieved_flops']['median'] / 1e9)} of "
                         f"{fmt_num(c['peak_flops']['median'] / 1e9)}"
                         " GFLOP/s" + ("; peak: best of the model's products" if "peak_product" in c
                                       else "; peak: square matmuls") + ")",
                         fmt_spread(s, 100) + " %", ">= 40 %", verdict(s["median"], 0.40, True), link])
    elif name == "p4_data":
        for w in ("1", "2"):
            for consumer, s in d["ratios"][w].items():
                rows.append([TITLES[name], f"loader ({w} worker{'s' if w != '1' else ''}, "
                             f"{fmt_num(d['loader_tokens_per_s'][w]['median'])} tokens/s) / training {consumer}",
                             fmt_spread(s), ">= 20", verdict(s["median"], 20, True), link])
    elif name == "p5_memory":
        for s in d["stages"]:
            target = "<= 1.1" if s["stage"] == 3 else "-"
            rows.append([TITLES[name], f"ZeRO-{s['stage']} per-rank params+grads+optimizer: "
                         f"{fmt_num(s['measured']['total'] / 2**20)} MiB measured vs "
                         f"{fmt_num(s['ideal']['total'] / 2**20)} MiB ideal",
                         f"{s['ratio']:.3f} x ideal", target,
                         verdict(s["ratio"], 1.1, False) if s["stage"] == 3 else "-", link])
    elif name == "scaling":
        dps = d.get("dp") or [1, 2]
        lo, hi = str(dps[0]), str(dps[-1])
        for c in d["cases"]:
            t1, t2 = c["tokens_per_s"][lo], c["tokens_per_s"][hi]
            rows.append([TITLES[name], f"{c['model']}: DP={lo} ({lo}x{c['threads_per_rank'][lo]} threads) "
                         f"{fmt_num(t1['median'])} vs DP={hi} ({hi}x{c['threads_per_rank'][hi]} threads) "
                         f"{fmt_num(t2['median'])} tokens/s",
                         f"{c['dp2_over_dp1']:.2f} (DP={hi} / DP={lo})", "reported", "-", link])
    for skip in d["meta"].get("skipped", []):  # cases this machine did not run (bf16 without native bf16)
        rows.append([TITLES[name], f"{skip['case']}: not run", "-", TARGETS.get(name, "-"),
                     f"skipped: {skip['reason']}", link])
    return rows


def main() -> int:
    found = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in ORDER if (RESULTS / f"{n}.json").is_file()}
    missing = [n for n in ORDER if n not in found]
    rows = [r for n, d in found.items() for r in rows_for(n, d)]
    first = next(iter(found.values()))["meta"] if found else None
    plots = "\n".join(f"![{TITLES[n]}]({n}.png)" for n in found if (RESULTS / f"{n}.png").is_file())
    runs = "\n".join(f"- {TITLES[n]}: {d['meta']['date']}, load {d['meta']['load_avg_1min_at_start']}"
                     f"/{d['meta'].get('load_avg_1min_at_end', '?')}" for n, d in found.items())
    md = f"""# largelm benchmarks: summary

Generated by `bash bench/run_all.sh` (each benchmark: `python bench/<name>.py`; method, formulas and GPU commands
in [bench/README.md](../README.md)). Timed figures are ratios of arms measured side by side in the same process
or run, interleaved repetitions: median [IQR] (min-max). Each linked page has the raw numbers, configs and
the run record; the JSON files next to it have every repetition.

{machines_text(found) if found else ""}

bf16 is fast only where the CPU computes it natively (AVX512_BF16/AMX; on an AVX2-only CPU it is 30-85x slower
than fp32): `precision: auto`, what largelm ships, picks bf16 there and fp32 elsewhere, and bf16 cases are
skipped, with the reason, where bf16 is not native and not cheap.

{md_table(["benchmark", "figure", "measured", "target", "verdict", "details"], rows)}

Where a target is missed, the profile-based reasons and the changes already made to largelm for these
benchmarks are in [bench/README.md, "Findings"]\
(../README.md#findings-behind-the-figures-profiling-and-what-was-changed-in-largelm).
{"" if not missing else chr(10) + "Not run: " + ", ".join(missing) + chr(10)}
{plots}

## Runs

Machine load during each benchmark (1-min load average at start/end; 2 means the cores were busy with this
benchmark only):

{runs}

{meta_markdown(first, machine_only=True) if first else ""}
"""
    (RESULTS / "summary.md").write_text(md)
    print(f"wrote {RESULTS / 'summary.md'}")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
