"""benchmark_log.parse on real benchmark_model output (tests/data/benchmark_model_samples.txt, sources kept)."""

import re
from pathlib import Path

import pytest

from edgeq.errors import DeviceError, EdgeqError
from edgeq.runners import benchmark_log

SAMPLES = Path(__file__).parent / "data" / "benchmark_model_samples.txt"


def samples():
    """{'Source 1': text, ...} split on the '## Source N:' headers of the samples file."""
    parts = re.split(r"^## (Source \d+):.*$", SAMPLES.read_text(), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_samples_file_keeps_its_sources():
    text = SAMPLES.read_text()
    heads = re.findall(r"^## Source \d+: (\S+)", text, flags=re.M)
    assert len(heads) == 9
    assert heads[0] == "https://github.com/tensorflow/tensorflow/issues/42507"
    assert heads[6] == "https://github.com/tensorflow/tensorflow/issues/56301"
    assert heads[8] == "https://github.com/tensorflow/tensorflow/issues/43541"
    assert all(h.startswith(("http", "TI", "same")) for h in heads)


def test_android_sample_with_warmup_line_and_old_memory_line():
    r = benchmark_log.parse(samples()["Source 1"])
    assert r["schema"] == "edgeq.bench/1"
    assert r["init_ms"] == pytest.approx(0.855)
    assert r["first_inference_ms"] == pytest.approx(49.060)
    assert r["warmup"] == {"count": 15, "avg_ms": pytest.approx(34.8251)}
    runs = r["runs"]
    assert runs["count"] == 50
    assert (runs["min_ms"], runs["max_ms"]) == (pytest.approx(32.641), pytest.approx(34.005))
    assert runs["mean_ms"] == pytest.approx(33.2094)
    assert runs["std_ms"] == pytest.approx(0.450)
    assert runs["p95_ms"] is None  # this older build prints no percentiles
    # "Peak memory footprint (MB): init=0 overall=12.8672" was the delta in those builds.
    assert r["memory_mb"] == {"init_delta": 0.0, "overall_delta": pytest.approx(12.8672), "peak_rss": None}
    assert r["delegate_coverage"] is None and r["errors"] == []


def test_info_prefix_scientific_notation_and_percentiles():
    r = benchmark_log.parse(samples()["Source 2"])
    runs = r["runs"]
    # avg=1.24027e+06 us (C++ default float formatting) -> 1240.27 ms
    assert runs["mean_ms"] == pytest.approx(1240.27)
    assert (runs["p5_ms"], runs["median_ms"], runs["p95_ms"]) == (
        pytest.approx(1238.753), pytest.approx(1239.807), pytest.approx(1247.415))
    assert runs["min_ms"] <= runs["p5_ms"] <= runs["median_ms"] <= runs["p95_ms"] <= runs["max_ms"]
    assert r["warmup"]["avg_ms"] == pytest.approx(1357.6)  # "Warmup (avg): 1.3576e+06"
    assert r["warmup"]["count"] is None  # the warmup count= line is not in this sample
    assert r["memory_mb"]["init_delta"] == pytest.approx(6.36328)
    assert r["memory_mb"]["overall_delta"] == pytest.approx(109.832)


def test_logcat_line_from_the_benchmark_app():
    r = benchmark_log.parse(samples()["Source 3"])
    assert (r["init_ms"], r["first_inference_ms"]) == (pytest.approx(5.685), pytest.approx(18.535))
    assert r["runs"]["mean_ms"] == pytest.approx(14.5752)
    assert r["runs"]["count"] is None


def test_full_logcat_threadtime_prefix():
    # The Source 2 lines as `adb logcat -v threadtime` shows them (prefix format of logcat).
    body = [ln.strip() for ln in samples()["Source 2"].splitlines() if ln.strip()]
    text = "\n".join("11-23 10:00:00.%03d  1234  1234 I tflite  : %s" % (i, ln) for i, ln in enumerate(body))
    assert benchmark_log.parse(text)["runs"] == benchmark_log.parse(samples()["Source 2"])["runs"]
    assert benchmark_log.strip_prefix("11-23 10:00:00.000  1234  1234 I tflite  : INFO: count=3") == "count=3"
    assert benchmark_log.strip_prefix("I/tflite  ( 1234): Replacing 1") == "Replacing 1"


def test_nnapi_run_delegate_coverage_version_and_single_warmup():
    r = benchmark_log.parse(samples()["Source 4"])
    assert r["runtime"] == {"name": "benchmark_model", "version": "2.15.0"}
    assert r["delegate_coverage"] == {"delegated": 31, "total": 31, "delegate": "TfLiteNnapiDelegate",
                                      "ratio": 1.0}
    assert r["warmup"] == {"count": 1, "avg_ms": pytest.approx(637.079)}  # "count=1 curr=637079"
    assert r["runs"]["count"] == 520 and r["runs"]["mean_ms"] == pytest.approx(1.88574)
    assert r["memory_mb"]["overall_delta"] == pytest.approx(7.83203)


def test_op_profiling_table_and_cpu_ops():
    rows = benchmark_log.parse_op_profile(samples()["Source 5"])
    assert [r["node_type"] for r in rows] == ["TfLiteNnapiDelegate", "RESIZE_NEAREST_NEIGHBOR",
                                              "TfLiteNnapiDelegate"]
    assert rows[1] == {"node_type": "RESIZE_NEAREST_NEIGHBOR", "first_ms": 0.052, "avg_ms": 0.058,
                       "pct": 0.899, "cdf_pct": 62.936, "mem_kb": 0.0, "times_called": 1, "name": "[]:38"}
    assert sum(r["pct"] for r in rows) == pytest.approx(100.0, abs=0.01)
    assert benchmark_log.cpu_ops(rows) == ["RESIZE_NEAREST_NEIGHBOR"]


def test_old_replacing_line_without_total_and_error_lines():
    r = benchmark_log.parse(samples()["Source 6"])
    assert r["delegate_coverage"] == {"delegated": 31, "total": None, "delegate": "TfLiteNnapiDelegate",
                                      "ratio": None}
    assert r["runs"]["mean_ms"] == pytest.approx(1.38086)
    assert r["warmup"]["avg_ms"] == pytest.approx(1599.06)
    assert len(r["errors"]) == 1 and "couldn't be opened for reading" in r["errors"][0]


def test_coverage_picks_the_requested_delegate_and_sums_subgraphs():
    d = [{"delegated": 31, "total": 31, "delegate": "TfLiteXNNPackDelegate", "partitions": 1},
         {"delegated": 20, "total": 31, "delegate": "TfLiteGpuDelegateV2", "partitions": 2},
         {"delegated": 4, "total": 9, "delegate": "TfLiteGpuDelegateV2", "partitions": 1}]
    cov = benchmark_log.coverage(d, "gpu")
    assert cov == {"delegated": 24, "total": 40, "delegate": "TfLiteGpuDelegateV2", "ratio": 0.6}
    assert benchmark_log.coverage(d, "nnapi") is None
    assert benchmark_log.coverage(d)["delegate"] == "TfLiteGpuDelegateV2"


def test_text_without_statistics_raises_with_the_error_line():
    text = "INFO: STARTING!\nERROR: Failed to apply GPU delegate.\nBenchmarking failed.\n"
    with pytest.raises(DeviceError, match="Failed to apply GPU delegate") as e:
        benchmark_log.parse(text)
    assert isinstance(e.value, EdgeqError) and "\n" not in str(e.value)
    with pytest.raises(EdgeqError):
        benchmark_log.parse(samples()["Source 5"])  # a table alone has no timings


def not_executed_log(s):
    """Source 8 (NNAPI runs no node; the stored comment ends at that statement) followed by the
    statistics lines of Source 7 (same issue, same user and phone)."""
    return s["Source 8"] + "\n" + s["Source 7"].split("\n", 2)[2]


def test_the_three_delegate_statements_in_real_logs():
    """benchmark_model's statement after applying a delegate (benchmark_tflite_model.cc), verbatim."""
    s = samples()
    full = benchmark_log.parse(s["Source 4"])  # Replacing 31 out of 31 + "completely executed"
    assert benchmark_log.delegate_coverage(full, ("nnapi",)) == {
        "delegated": 31, "total": 31, "delegate": "TfLiteNnapiDelegate", "ratio": 1.0,
        "execution": "complete", "kernels": None}
    gpu = benchmark_log.parse(s["Source 9"])  # no Replacing line: "completely executed" alone
    assert benchmark_log.delegate_coverage(gpu, ("gpu",)) == {
        "delegated": None, "total": None, "delegate": "GPU", "ratio": 1.0, "execution": "complete", "kernels": None}
    assert gpu["runs"]["mean_ms"] == pytest.approx(119.375) and gpu["warmup"]["count"] == 4
    part = benchmark_log.parse(s["Source 7"])  # "partially executed ... w/ 44 delegate kernels", no node count
    assert part["delegate_statements"] == [{"delegate": "NNAPI", "execution": "partial", "kernels": 44}]
    assert benchmark_log.delegate_coverage(part, ("nnapi",))["ratio"] is None
    assert part["runs"]["count"] == 75 and part["runs"]["mean_ms"] == pytest.approx(12.1676)
    none = benchmark_log.parse(not_executed_log(s))  # "will not be executed by the delegate"
    assert none["nnapi_accelerators"] == ["ipuadaptor", "nnapi-reference"]
    assert benchmark_log.delegate_coverage(none, ("nnapi",)) == {
        "delegated": 0, "total": None, "delegate": "NNAPI", "ratio": 0.0, "execution": "none", "kernels": 0}
    assert benchmark_log.delegate_coverage(none, ("gpu",)) is None  # says nothing about another delegate
    # The statement wins over a Replacing line: nodes claimed, then nothing executed (Source 4's
    # Replacing line followed by Source 8's statement, both verbatim) is coverage 0.
    claimed = [ln for ln in s["Source 4"].splitlines() if "Replacing" in ln] + [not_executed_log(s)]
    cov = benchmark_log.delegate_coverage(benchmark_log.parse("\n".join(claimed)), ("nnapi",))
    assert (cov["delegated"], cov["total"], cov["ratio"], cov["execution"]) == (0, 31, 0.0, "none")
