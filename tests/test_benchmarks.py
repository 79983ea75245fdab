"""The benchmark scripts on tiny sizes: they run, print their tables, and measure memory correctly.
(Times are printed, never asserted.)"""
import json
import re
import textwrap

import pytest
import torch

from experiments import bench_data, bench_quantizers, bench_sampling, bench_tokenizer

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


def test_sampling_benchmark_runs_every_prior_configuration_against_its_floor(capsys):
    bench_sampling.main(["--batch-size", "1", "--grid", "2", "--codebook-size", "16", "--num-classes", "3",
                         "--repeats", "1", "--no-cache-repeats", "1"])
    table = capsys.readouterr().out
    rows = re.findall(r"^\| (maskgit|gpt) \| ([^|]+) \| (\d+) \|.*\| ([0-9.]+) \| ([0-9.]+)x \| - \|$", table,
                      flags=re.M)
    assert [row[:3] for row in rows] == [("maskgit", "8 steps", "8"), ("maskgit", "16 steps", "16"),
                                         ("gpt", "static KV cache", "4"), ("gpt", "DynamicCache", "4"),
                                         ("gpt", "no KV cache", "4")]
    assert all(float(floor) > 0 for *_, floor, _ in rows)


def test_gpt_sizes_use_llamagen_swiglu_widths():
    assert bench_sampling.llamagen_ffn_width(768) == 2048 and bench_sampling.llamagen_ffn_width(256) == 768
    gpt_b = bench_sampling.build_prior("gpt", "base", 16384, 16, 1000, "meta")
    assert sum(p.numel() for p in gpt_b.parameters()) == 110_888_448


FAKE_AUTHORS_QUANTIZER = """
import torch
from torch import nn


class MultiBinDiscretizer(nn.Module):  # stand-in for the LGQ authors' quantizer: same constructor and call
    def __init__(self, embedding_dim, num_bins, tau=1.0, lambda_peak=0.0, lambda_bins=0.0, flatten_channels=True):
        super().__init__()
        self.centers = nn.Parameter(torch.zeros(num_bins, embedding_dim))
        self.register_buffer("_inited", torch.tensor(0, dtype=torch.uint8))
        self.tau = tau

    def forward(self, inputs):
        assert int(self._inited) == 1, "the benchmark must hand over initialised centres"
        x = inputs.permute(0, 2, 1).reshape(-1, inputs.shape[1])
        p = torch.softmax(-torch.cdist(x, self.centers).pow(2) / self.tau, dim=1)
        q = p @ self.centers
        return ((q - x) ** 2).mean(), q.reshape(inputs.shape[0], -1, inputs.shape[1]).permute(0, 2, 1), None, None
"""


def write_fake_peer(root, files: dict) -> str:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(root)


def test_quantizer_benchmark_against_the_authors_code_from_a_given_path(capsys, tmp_path):
    authors = write_fake_peer(tmp_path / "LGQ", {"quantization/quantizers.py": FAKE_AUTHORS_QUANTIZER})
    json_path = tmp_path / "rows.json"
    assert bench_quantizers.main(["--quantizers", "lgq", "--authors-lgq", authors, "--K", "64", "--N", "512",
                                  "--dim", "8", "--repeats", "1", "--json", str(json_path)]) == 0
    table = capsys.readouterr().out
    rows = {r["quantizer"]: r for r in json.loads(json_path.read_text())}
    assert set(rows) == {"lgq", "lgq-authors"} and all(r["status"] == "ok" for r in rows.values())
    ratio = re.search(r"^\| lgq-authors \| 64 \| 512 \| [^|]+ \| [^|]+ \| ([0-9.]+)x \|", table, flags=re.M)
    assert ratio and float(ratio.group(1)) == pytest.approx(  # the authors' CPU time over ours, 2 decimals
        rows["lgq-authors"]["cpu_seconds"] / rows["lgq"]["cpu_seconds"], abs=0.006)
    assert "the authors' code at commit unknown commit (not a git checkout)" in table
    with pytest.raises(SystemExit):  # a path without the authors' quantizer is refused by name
        bench_quantizers.parse_args(["--authors-lgq", str(tmp_path)])


FAKE_LLAMAGEN_GPT = """
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelArgs:  # stand-in for LlamaGen's autoregressive/models/gpt.py: the fields the benchmark sets
    dim: int = 64
    n_layer: int = 1
    n_head: int = 1
    vocab_size: int = 16
    num_classes: int = 10
    block_size: int = 4
    cls_token_num: int = 1
    model_type: str = "c2i"
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.num_classes = config, config.num_classes
        self.cls_embedding = nn.Embedding(config.num_classes + 1, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        nn.init.constant_(self.output.weight, 0)
"""

FAKE_LLAMAGEN_GENERATE = """
import torch


@torch.no_grad()
def generate(model, cond, max_new_tokens, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, sample_logits=True):
    assert cfg_scale > 1.0 and float(model.output.weight.abs().sum()) > 0  # CFG on; output layer re-drawn
    h = model.cls_embedding(torch.cat([cond, torch.full_like(cond, model.num_classes)]))
    tokens = []
    for _ in range(max_new_tokens):
        cond_logits, uncond_logits = model.output(h).chunk(2)
        probs = torch.softmax(uncond_logits + cfg_scale * (cond_logits - uncond_logits), dim=-1)
        tokens.append(torch.multinomial(probs, 1))
        h = model.tok_embeddings(torch.cat([tokens[-1], tokens[-1]]))[:, 0]
    return torch.cat(tokens, dim=1)
"""


def test_sampling_benchmark_against_llamagen_from_a_given_path(capsys, tmp_path):
    llamagen = write_fake_peer(tmp_path / "LlamaGen", {"autoregressive/models/gpt.py": FAKE_LLAMAGEN_GPT,
                                                       "autoregressive/models/generate.py": FAKE_LLAMAGEN_GENERATE})
    assert bench_sampling.main(["--batch-size", "2", "--grid", "2", "--codebook-size", "16", "--num-classes", "3",
                                "--repeats", "1", "--configurations", "gpt-cache", "llamagen-gpt", "--llamagen", llamagen]) == 0
    table = capsys.readouterr().out
    seconds = dict(re.findall(r"^\| (gpt|llamagen-gpt) \| [^|]+ \| 4 \| [^|]+ \| [^|]+ \| ([0-9.]+) \|", table,
                              flags=re.M))  # CPU seconds
    ratio = re.search(r"^\| llamagen-gpt \| generate\(\), KV cache \|.*\| ([0-9.]+)x \|$", table, flags=re.M)
    assert set(seconds) == {"gpt", "llamagen-gpt"} and ratio
    # the ratio is of the unrounded CPU times; the table prints them to 3 decimals (+-0.0005) and the ratio to 2
    peer, ours = float(seconds["llamagen-gpt"]), float(seconds["gpt"])
    low, high = max(peer - 0.0005, 0.0) / (ours + 0.0005), (peer + 0.0005) / max(ours - 0.0005, 1e-9)
    assert low - 0.005 <= float(ratio.group(1)) <= high + 0.005
    assert "LlamaGen at commit unknown commit (not a git checkout)" in table
    with pytest.raises(SystemExit):
        bench_sampling.parse_args(["--llamagen", str(tmp_path)])


def test_sampling_benchmark_compiles_both_samplers(capsys, tmp_path):
    """--compile: our prior's decoding backbone (compile_sampling) and LlamaGen's model, warmed up on the full
    batch; the rows say so and the peer's ratio is still against our (compiled) GPT."""
    llamagen = write_fake_peer(tmp_path / "LlamaGen", {"autoregressive/models/gpt.py": FAKE_LLAMAGEN_GPT,
                                                       "autoregressive/models/generate.py": FAKE_LLAMAGEN_GENERATE})
    assert bench_sampling.main(["--batch-size", "2", "--grid", "2", "--codebook-size", "16", "--num-classes", "3",
                                "--repeats", "1", "--configurations", "gpt-cache", "llamagen-gpt", "--llamagen", llamagen,
                                "--compile"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\| gpt \| static KV cache, compiled \| 4 \|.* - \|$", table, flags=re.M)
    assert re.search(r"^\| llamagen-gpt \| generate\(\), KV cache, compiled \|.*\| [0-9.]+x \|$", table, flags=re.M)
    assert "full-batch (compiling) warm-up" in table


def test_a_failing_peer_is_reported_with_its_traceback(tmp_path, capsys):
    """A worker that fails names the configuration, its exit code and the error itself (the last lines of its
    stderr), not the last log line a library printed after it."""
    broken = FAKE_LLAMAGEN_GENERATE.replace("    tokens = []", "    raise ValueError('peer generate broke')")
    llamagen = write_fake_peer(tmp_path / "LlamaGen", {"autoregressive/models/gpt.py": FAKE_LLAMAGEN_GPT,
                                                       "autoregressive/models/generate.py": broken})
    with pytest.raises(RuntimeError, match=r"(?s)llamagen-gpt failed \(exit code 1\).*ValueError: peer generate broke"):
        bench_sampling.main(["--batch-size", "2", "--grid", "2", "--codebook-size", "16", "--num-classes", "3",
                             "--repeats", "1", "--configurations", "gpt-cache", "llamagen-gpt", "--llamagen", llamagen])
    # the configurations that finished are still measured and printed before the run fails
    assert re.search(r"^\| gpt \| static KV cache \| 4 \|", capsys.readouterr().out, flags=re.M)


FAKE_LLAMAGEN_VQ_MODEL = """
import torch
from torch import nn


class VQModel(nn.Module):  # stand-in for LlamaGen's VQ-16: same factory, same forward outputs
    def __init__(self, codebook_size, codebook_embed_dim):
        super().__init__()
        self.encoder = nn.Conv2d(3, codebook_embed_dim, 16, stride=16)
        self.decoder = nn.ConvTranspose2d(codebook_embed_dim, 3, 16, stride=16)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook_size, codebook_embed_dim)

    def forward(self, x):
        z = self.encoder(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.quantize.embedding(torch.cdist(flat, self.quantize.embedding.weight).argmin(1))
        vq_loss, commit_loss = ((codes - flat.detach()) ** 2).mean(), 0.25 * ((codes.detach() - flat) ** 2).mean()
        z_q = (flat + (codes - flat).detach()).reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return self.decoder(z_q), (vq_loss, commit_loss, None, 0)


def VQ_16(codebook_size=16384, codebook_embed_dim=8):
    return VQModel(codebook_size, codebook_embed_dim)
"""


def test_tokenizer_benchmark_against_llamagen_vq16_from_a_given_path(capsys, tmp_path):
    llamagen = write_fake_peer(tmp_path / "LlamaGen", {"tokenizer/tokenizer_image/vq_model.py": FAKE_LLAMAGEN_VQ_MODEL})
    assert bench_tokenizer.main(["--llamagen", llamagen, "--image-size", "32", "--batch-size", "1", "--K", "64",
                                 "--repeats", "1", "--precisions", "fp32"]) == 0
    table = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (ours|llamagen) \| fp32 \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|", table, flags=re.M))
    assert set(rows) == {"ours", "llamagen"}  # CPU seconds
    ratio = re.search(r"^\| llamagen \| fp32 \|[^|]+\|[^|]+\|[^|]+\| ([0-9.]+)x \| (\d+) \|$", table, flags=re.M)
    assert ratio and float(ratio.group(1)) == pytest.approx(float(rows["llamagen"]) / float(rows["ours"]), abs=0.03)
    assert re.search(r"^\| ours \| fp32 \| 70\.0 \|", table, flags=re.M)  # the ImageNet recipe's widths
    with pytest.raises(SystemExit):
        bench_tokenizer.parse_args(["--llamagen", str(tmp_path)])


def test_data_benchmark_times_every_source_and_worker_count_and_a_tokenizer_step(capsys, tmp_path):
    tiny = "configs/tokenizer/tiny.yaml"
    results = bench_data.main(["--images", "40", "--size", "32", "--workers", "0,1", "--step-batch", "2",
                               "--tokenizer-config", tiny, "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(results["loader"]) == {(s, w) for s in ("imagefolder", "hf", "webdataset") for w in (0, 1)}
    assert all(rate > 0 for rate in results["loader"].values()) and results["step"] > 0
    for source in ("imagefolder", "hf", "webdataset"):
        assert re.search(rf"^{source} +1 +\d+ +\(8 images timed\)", out, re.M), out  # 40 images - first batch of 32
    assert "tokenizer step (lgq tokenizer" in out and "workers per cpu device" in out
    assert not list(tmp_path.iterdir())  # the photos are written to a temporary folder and removed


def test_sampling_profile_splits_the_call_into_matrix_products_attention_and_the_rest(capsys):
    args = bench_sampling.parse_args(["--batch-size", "2", "--grid", "2", "--codebook-size", "16", "--num-classes", "3",
                                      "--repeats", "1", "--configurations", "maskgit-8", "gpt-cache", "--profile"])
    rows, failures = bench_sampling.benchmark(args)  # each configuration in a fresh worker process
    assert failures == []
    assert [row["prior"] for row in rows] == ["maskgit", "gpt"]
    for row in rows:
        p = row["profile"]
        assert p["matmul_seconds"] > 0 and p["gemm_floor_seconds"] > 0 and len(p["top_other_ops"]) == 3
        assert all(not op.startswith("aten::mm") and seconds >= 0 for op, seconds in p["top_other_ops"])
        parts = p["matmul_seconds"] + p["attention_seconds"] + p["other_seconds"]
        assert p["outside_seconds"] == pytest.approx(max(p["call_seconds"] - parts, 0.0))
    table = bench_sampling.profile_table(rows)
    versus = [float(v) for v in re.findall(r"\| ([0-9.]+)x \|$", table, flags=re.M)]
    expected = [r["cpu_seconds"] / max(r["profile"]["gemm_floor_seconds"], r["floor_seconds"]) for r in rows]
    assert versus == pytest.approx(expected, abs=0.006)


def test_matmul_floor_times_each_recorded_op_at_its_shapes():
    assert bench_sampling.op_category("aten::addmm") == "matmul"
    assert bench_sampling.op_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bench_sampling.op_category("aten::silu") == "other"
    for name, shapes in [("aten::mm", [[4, 8], [8, 16]]), ("aten::addmm", [[16], [4, 8], [8, 16], [], []]),
                         ("aten::bmm", [[2, 4, 8], [2, 8, 16]]), ("aten::baddbmm", [[2, 4, 16], [2, 4, 8], [2, 8, 16], [], []])]:
        assert bench_sampling.matmul_seconds(name, shapes, "cpu") > 0
    with pytest.raises(RuntimeError):  # shapes that do not multiply are not silently timed
        bench_sampling.matmul_seconds("aten::mm", [[4, 8], [9, 16]], "cpu")
