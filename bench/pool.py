"""Pool several `make bench` runs: medians over every round of each, and the ratios of those.

    python -m bench.pool first.json second.json ...

On a machine whose speed drifts from run to run (see README.md, Performance), one run's median
of a few rounds moves the ratios by ±10%; the median over the rounds of several interleaved
runs is steadier. Save each run's bench/results.json under its own name first (or use
`make bench BENCH_ARGS="--output ..."`).
"""

import json
import statistics
import sys

TOOLS = {
    "eke_get": "eketwist get",
    "eke_put": "eketwist put",
    "sftp_aes128-gcm": "sftp get, aes128-gcm",
    "sftp_put_aes128-gcm": "sftp put, aes128-gcm",
    "raw_tcp": "raw TCP",
}


def pooled_seconds(runs, key):
    return statistics.median(seconds for run in runs for seconds in run[key]["runs"])


def main(paths):
    if not paths:
        sys.exit(__doc__)
    runs = [json.loads(open(path).read()) for path in paths]
    if len({run["size_bytes"] for run in runs}) != 1:
        sys.exit("the runs moved files of different sizes: pool runs of the same --size-mib")
    size = runs[0]["size_bytes"]
    rounds = sum(run["repeat"] for run in runs)
    seconds = {key: pooled_seconds(runs, key) for key in TOOLS if all(key in run for run in runs)}
    print(f"{len(runs)} runs, {rounds} rounds of each tool, medians over all rounds:")
    for key, name in TOOLS.items():
        if key in seconds:
            print(f"  {name:<24} {size / seconds[key] / 1e6:6.0f} MB/s")
    if "sftp_aes128-gcm" in seconds:
        sftp_get = seconds["sftp_aes128-gcm"]
        print(f"  eketwist get / sftp get  {sftp_get / seconds['eke_get']:.2f}x")
        print(f"  eketwist put / sftp get  {sftp_get / seconds['eke_put']:.2f}x")
    if "sftp_put_aes128-gcm" in seconds:
        print(f"  eketwist put / sftp put  {seconds['sftp_put_aes128-gcm'] / seconds['eke_put']:.2f}x")
    for path, run in zip(paths, runs):
        ratios = run.get("ratios", {})
        shown = ", ".join(f"{name} {ratios[key]:.2f}x" for key, name in (
            ("get_vs_sftp_aes128_gcm", "get/sftp get"), ("put_vs_sftp_put_aes128_gcm", "put/sftp put"),
            ("put_vs_sftp_aes128_gcm", "put/sftp get")) if key in ratios)
        print(f"  {path}: {shown}")


if __name__ == "__main__":
    main(sys.argv[1:])
