"""The benchmark scripts on tiny sizes: they run, print their tables, and measure memory correctly.
(Times are printed, never asserted.)"""
import json
import re

import pytest
import torch

from experiments import bench_quantizers, bench_sampling

MIB = 2**20


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the quantizer benchmark's worker subprocesses
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cpu_allocated_peak_replays_allocations_and_frees():
    def step():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 4 MiB -> 8 MiB held
        del a  # 4 MiB
        c = torch.ones(2048, 1024)  # 8 MiB -> 12 MiB held: the peak
        del b, c
        d = torch.ones(512, 1024)  # 2 MiB, after the peak
        return d.sum()

    peak = bench_quantizers.cpu_allocated_peak_bytes(step)
    assert 12 * MIB <= peak < 12 * MIB + 64 * 1024


def test_quantizer_benchmark_table_and_memory_growing_with_codebook_size(capsys, tmp_path):
    json_path = tmp_path / "rows.json"
    assert bench_quantizers.main(["--quantizers", "lgq", "fsq", "--K", "1024", "4096", "--N", "512", "--dim", "8",
                                  "--repeats", "1", "--json", str(json_path)]) == 0
    table = capsys.readouterr().out
    rows = {(r["quantizer"], r["K"]): r for r in json.loads(json_path.read_text())}
    assert set(rows) == {(q, k) for q in ("lgq", "fsq") for k in (1024, 4096)}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows.values())
    # LGQ holds [chunk, K] fp32 work buffers (here chunk = N = 512): at least 2 x 512 x K x 4 bytes
    for k in (1024, 4096):
        assert rows[("lgq", k)]["peak_bytes"] >= 2 * 512 * k * 4
    assert rows[("lgq", 4096)]["peak_bytes"] > 3 * rows[("lgq", 1024)]["peak_bytes"]
    assert rows[("fsq", 4096)]["peak_bytes"] < rows[("lgq", 4096)]["peak_bytes"] / 10  # no N x K tensor in FSQ
    assert len(re.findall(r"^\| (lgq|fsq) \| (1024|4096) \| 512 \|", table, flags=re.M)) == 4


def test_sampling_benchmark_runs_every_prior_configuration(capsys):
    bench_sampling.main(["--batch-size", "1", "--grid", "2", "--codebook-size", "16", "--num-classes", "3",
                         "--repeats", "1", "--no-cache-repeats", "1"])
    table = capsys.readouterr().out
    rows = re.findall(r"^\| (maskgit|gpt) \| ([^|]+) \| (\d+) \|", table, flags=re.M)
    assert rows == [("maskgit", "8 steps", "8"), ("maskgit", "16 steps", "16"), ("gpt", "KV cache", "4"),
                    ("gpt", "no KV cache", "4")]
