"""`make bench`: every benchmark in bench/, one after another, then one table.

    .venv/bin/python bench/run.py [--quick]

Runs bench/transfer.py (training rows and the seed's claim), bench/data_path.py (S3 pipeline,
index at scale), bench/tune_schedulers.py (ASHA against synchronous HyperBand, and trials
sharing the frozen-prefix cache) and bench/shards.py (tar shards against one object per image),
each in its own process so each starts its own Ray. Each
writes its section of bench/results.json; this prints the table made from them and writes it,
with the machine's details and each part's wall time, into bench/RESULTS.md between
`<!-- bench:begin -->` and `<!-- bench:end -->`. `--quick` runs every part at toy sizes (a smoke
run, a few minutes; its numbers are not benchmark results and RESULTS.md is left alone).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ENV, load_results, machine  # noqa: E402

BUDGET_S = 15 * 60
PARTS = {
    "transfer": ["transfer.py"],
    "data_path": ["data_path.py", "--s3-images", "1000"],
    "tune": ["tune_schedulers.py"],
    "shards": ["shards.py"],
    "demo": ["demo_time.py"],
}
QUICK = {
    "transfer": ["--images", "300", "--epochs", "2", "--batch", "32", "--claim-images", "600", "--depths", "2"],
    "data_path": ["--s3-images", "100", "--index-keys", "20000"],
    "tune": ["--samples", "2", "--epochs", "2", "--images", "120"],
    "shards": ["--images", "2000", "--objects", "500"],
    "demo": ["--quick", "--k", "5"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs")
    parser.add_argument("--json", default=str(BENCH / "results.json"))
    args = parser.parse_args(argv)
    host = machine()
    walls = {}
    for part, script in PARTS.items():
        extra = QUICK[part] if args.quick else []
        print(f"[bench] {part}: {' '.join(script + extra)}", flush=True)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(BENCH / script[0]), *script[1:], *extra, "--json", args.json], env=ENV, check=True
        )
        walls[part] = time.perf_counter() - started
    results = load_results(args.json)
    text = table(results)
    total = sum(walls.values())
    timing = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in walls.items())
    print(text)
    print(f"[bench] all parts in {total:.0f} s ({timing}); budget {BUDGET_S} s")
    if not args.quick:
        write_results_md(BENCH / "RESULTS.md", host, text, f"{total:.0f} s ({timing})")
    return 0


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def table(results: dict) -> str:
    lines = ["| measurement | tlray | reference | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    transfer = results.get("transfer", {})
    if "modes" in transfer:
        lines += mode_lines(transfer["modes"])
    if "claim" in transfer:
        lines += claim_lines(transfer["claim"])
    if "tune" in results:
        lines += tune_lines(results["tune"])
    if "demo" in results:
        lines += demo_lines(results["demo"])
    if "data_path" in results:
        lines += data_path_lines(results["data_path"])
    if "shards" in results:
        lines += shards_lines(results["shards"])
    return "\n".join(lines)


def mode_lines(modes: dict) -> list[str]:
    rows = modes["rows"]
    lines = [
        f"| **{modes['arch']}, {modes['images']:,} images at {modes['image_size']} px, 1 worker**: steady-state "
        "epoch s (first epoch / feature pass); speedup over the full fine-tune; FLOP-model prediction | "
        "| | | | |"
    ]
    for row in rows:
        ours, plain = row["tlray"], row["plain"]
        first = "feature pass" if row["cached"] else "first epoch"
        ours_first = ours["feature_pass_s"] if row["cached"] else ours["epoch_s"][0]
        plain_first = plain["feature_pass_s"] if row["cached"] else plain["epoch_s"][0]
        target, met = "", ""
        if 0 < row["depth"] < max(r["depth"] for r in rows) and not row["cached"]:
            target, met = ">= 90% of the FLOP model", yes(row["achieved_over_predicted"] >= 0.9)
        lines.append(
            f"| {row['mode']}, {'cache' if row['cached'] else 'no cache'} (phi {row['phi']:.3f}) "
            f"| {ours['steady_s']:.3f} s ({first} {ours_first:.2f} s); {ours['speedup']:.2f}x, predicted "
            f"{row['predicted']:.3g}x: {row['achieved_over_predicted']:.0%} "
            f"| plain loop {plain['steady_s']:.3f} s ({first} {plain_first:.2f} s); {plain['speedup']:.2f}x "
            f"| {ours['steady_s'] / plain['steady_s']:.2f}x | {target} | {met} |"
        )
    fe_cached = next(r for r in rows if r["cached"] and r["phi"] == max(x["phi"] for x in rows))
    fe_plain = next(r for r in rows if not r["cached"] and r["depth"] == fe_cached["depth"])
    head_speedup = fe_plain["tlray"]["steady_s"] / fe_cached["tlray"]["steady_s"]
    lines.append(
        "| cached head-only epoch against recomputing the backbone (feature extractor) "
        f"| {fe_cached['tlray']['steady_s']:.3f} s | {fe_plain['tlray']['steady_s']:.3f} s "
        f"| {head_speedup:.0f}x faster | >= 100x | {yes(head_speedup >= 100)} |"
    )
    ours_total = fe_cached["tlray"]["feature_pass_s"] + sum(fe_cached["tlray"]["epoch_s"])
    plain_total = fe_cached["plain"]["feature_pass_s"] + sum(fe_cached["plain"]["epoch_s"])
    ratio = ours_total / plain_total
    lines.append(
        f"| feature extractor with the cache at {modes['images']:,} images: feature pass + every epoch "
        f"| {ours_total:.2f} s "
        f"| plain loop with a cache {plain_total:.2f} s | {ratio:.2f}x | <= 1.2x | {yes(ratio <= 1.2)} |"
    )
    return lines


CLAIM_TOTAL_S = 30  # the seed's claim, Ray start-up included
OVERHEAD_S = 5  # per run, outside the feature pass and the epochs (and Ray's start-up)
FEATURE_PASS_RATIO = 0.9  # of the plain loop's images/s


def claim_lines(claim: dict) -> list[str]:
    head, plain, timings = claim["head_epoch_s"], claim["plain_cached"], claim["timings"]
    ours = claim["feature_pass_s"] + sum(head)
    theirs = plain["feature_pass_s"] + sum(plain["epoch_s"])
    rate, plain_rate = (
        claim["feature_pass_images"] / claim["feature_pass_s"],
        plain["feature_pass_images"] / plain["feature_pass_s"],
    )
    parts = overhead_parts(timings)
    overhead = sum(parts.values())
    timed = sum(timings[part] for part in ("index", "weights", "cluster", "plan", "fit", "publish"))
    lines = [
        f"| feature pass at {claim['images']:,} images (decode + frozen backbone, train and val once): images/s "
        f"| {rate:.0f} | plain loop {plain_rate:.0f} | {rate / plain_rate:.2f}x | >= {FEATURE_PASS_RATIO}x "
        f"| {yes(rate / plain_rate >= FEATURE_PASS_RATIO)} |",
        f"| feature extractor with the cache at {claim['images']:,} images: feature pass + 10 epochs "
        f"| {ours:.1f} s | plain loop with a cache {theirs:.1f} s | {ours / theirs:.2f}x | <= 1.2x "
        f"| {yes(ours / theirs <= 1.2)} |",
        f"| **the seed's claim**: `tlray train`, {claim['images']:,} images at 32 px, ResNet-18 feature extractor, "
        f"10 epochs: Ray start-up {timings['cluster']:.1f} s, feature pass {claim['feature_pass_s']:.1f} s, "
        f"head epochs {min(head):.2f}-{max(head):.2f} s, fit {timings['fit']:.1f} s, val_accuracy "
        f"{claim['val_accuracy']:.3f}; the command's wall, Ray start-up included | {claim['total_s']:.1f} s "
        f"| plain loop with a cache {theirs:.1f} s | {claim['total_s'] / theirs:.2f}x | <= {CLAIM_TOTAL_S} s, "
        f"<= 1.2x | {yes(claim['total_s'] <= CLAIM_TOTAL_S and claim['total_s'] / theirs <= 1.2)} |",
    ]
    lines += [f"| the claim's overhead: {part} | {seconds:.2f} s | | | | |" for part, seconds in parts.items()]
    lines.append(
        f"| the claim's overhead outside the feature pass, the epochs and Ray start-up (the parts above) "
        f"| {overhead:.1f} s | the command's other time (imports, Ray shutdown) "
        f"{claim['total_s'] - timed:.1f} s "
        f"| | <= {OVERHEAD_S} s | {yes(overhead <= OVERHEAD_S)} |"
    )
    return lines


def overhead_parts(timings: dict) -> dict[str, float]:
    """The run's timings (metadata.json) outside the epochs: what a run costs besides its work."""
    return {
        "indexing the files": timings["index"],
        "weights and the run plan": timings["weights"] + timings["plan"],
        "worker start-up, checkpoints": timings["fit"] - timings["epochs"],
        "export and publish": timings["publish"],
    }


def demo_lines(demo: dict) -> list[str]:
    sources = " + ".join(f"{s:.0f}" for s in demo["sources_wall_s"])
    searches = " + ".join(f"{s:.0f}" for s in demo["searches_wall_s"])
    return [
        f"| `make demo` (k = {demo['k']}{', --quick' if demo['quick'] else ''}) in a fresh folder: {demo['jobs']} "
        f"jobs; sources {sources} s, searches {searches} s, every row's epochs {demo['rows_train_s']:.0f} s "
        f"| {demo['wall_s']:.0f} s | | | {demo['target']} | {demo['met']} |"
    ]


def tune_lines(tune: dict) -> list[str]:
    lines = []
    for name, search in tune.get("searches", {}).items():
        lines.append(
            f"| search, {name}: {search['trials']} trials x {search['max_epochs']} epochs; per trial start-up "
            f"{search['startup_s_per_trial']:.1f} s, training {search['train_s_per_trial']:.1f} s | "
            f"{search['trial_epochs']} trial-epochs, {search['wall_s']:.0f} s, best {search['best']:.4f} "
            f"| {search['reference']} | {search['epochs_share']:.0%} | {search['target']} | {search['met']} |"
        )
    startup = tune.get("trial_startup")
    if startup:
        lines.append(
            f"| trial start-up: {startup['trials']} trials x 4 epochs, ASHA, the demo's size; per trial start-up, "
            f"training; the search's wall | {startup['startup_s_per_trial']:.1f} s, "
            f"{startup['train_s_per_trial']:.1f} s; {startup['wall_s']:.0f} s | 20 s a trial on Ray Train's worker "
            f"group | | {startup['target']} | {startup['met']} |"
        )
    sharing = tune.get("cache_sharing")
    if sharing:
        cached, uncached = sharing["cached"], sharing.get("uncached")
        reference = f"without the cache: {uncached['wall_s']:.0f} s" if uncached else ""
        ratio = f"{cached['wall_s'] / uncached['wall_s']:.2f}x" if uncached else ""
        lines.append(
            f"| {sharing['trials']}-trial feature-extractor search, cache on: trials that computed activations "
            f"(images computed of {sharing['images']:,}), wall time | {cached['feature_passes']} "
            f"({cached['images_computed']:,}), {cached['wall_s']:.0f} s | {reference} | {ratio} | 1 trial "
            f"| {yes(cached['feature_passes'] == 1)} |"
        )
    return lines


def data_path_lines(results: dict) -> list[str]:
    lines = []
    io = results.get("pipeline_images_per_second")
    if io:
        for name in ("s3", "s3_30ms"):
            ratio = io[name] / io["local"]
            label = "S3 (moto, loopback)" if name == "s3" else "S3 + 30 ms per request"
            busy = results["store_server_cores_busy"][name]
            target, met = ("", "") if name == "s3" else (">= 0.8x", yes(ratio >= 0.8))
            lines.append(
                f"| pipeline images/s, {label} (store server busy {busy:.2f} cores) | {io[name]:.0f} "
                f"| local files {io['local']:.0f} | {ratio:.2f}x | {target} | {met} |"
            )
    ix = results.get("index_1m")
    if ix:
        lines.append(
            f"| driver: index {ix['keys']:,} keys | {ix['index_seconds']:.1f} s, peak +{ix['peak_rss_growth_mib']} MiB "
            f"RSS, {ix['shipped_to_workers_mib']} MiB shipped to workers | | | | |"
        )
    return lines


def shards_lines(results: dict) -> list[str]:
    shards, objects = results["rates"]["webdataset"], results["rates"]["objects"]
    return [
        f"| images/s read + decoded, S3 + {results['latency_ms']} ms per request: WebDataset tar shards "
        f"({shards['gets_per_batch']:.1f} GETs per batch of {results['batch']}) | {shards['images_per_second']:.0f} "
        f"| one object per image ({objects['images']:,} images) {objects['images_per_second']:.0f} "
        f"| {results['ratio']:.2f}x | >= 3x | {yes(results['ratio'] >= 3)} |"
    ]


def yes(condition: bool) -> str:
    return "yes" if condition else "**no**"


def write_results_md(path: Path, host: dict, table_text: str, walls: str) -> None:
    body = (
        f"`make bench` on {time.strftime('%Y-%m-%d')}: {host['cpus']} CPUs ({host['cpu_model']}), "
        f"{host['memory_gib']} GiB, GPU: {host['gpu'] or 'none'}; Python {host['python']}, torch {host['torch']}, "
        f"Ray {host['ray']}; load average before {', '.join(f'{x:.1f}' for x in host['load_average_before'])}. "
        f"Wall time {walls}.\n\n{table_text}\n"
    )
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin) + len(begin)] + "\n" + body + text[text.index(end) :]
    else:
        text = f"{begin}\n{body}{end}\n\n" + text
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
