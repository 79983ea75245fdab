"""eval/codebook_geometry.py on a tiny tokenizer whose codebook is known: centres on a line at 0, 1, 3, 7, 15."""
from __future__ import annotations

import json
import math

import pytest
import torch

from eval.codebook_geometry import GEOMETRY_FILE, PLOT_FILE, assignment_geometry, codebook_geometry, main
from tokenizer.model import LGQTokenizer

POSITIONS = [0.0, 1.0, 3.0, 7.0, 15.0]
COUNTS = [10, 5, 3, 1, 0]


def line_tokenizer(quantizer: str = "lgq") -> LGQTokenizer:
    torch.manual_seed(0)
    model = LGQTokenizer(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_dim=4,
                         codebook_size=len(POSITIONS), attention_resolutions="none", quantizer=quantizer).eval()
    centres = torch.zeros(len(POSITIONS), 4)
    centres[:, 1] = torch.tensor(POSITIONS)
    model.quantizer.codebook.data.copy_(centres)
    return model


def test_geometry_of_a_known_codebook(tmp_path):
    line_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "counts.json").write_text(json.dumps({"counts": COUNTS}))
    main(["--tokenizer", str(tmp_path / "tok"), "--output-dir", str(tmp_path / "geo"), "--counts",
          str(tmp_path / "counts.json"), "--neighbours", "2"])
    geometry = json.loads((tmp_path / "geo" / GEOMETRY_FILE).read_text())
    assert (tmp_path / "geo" / PLOT_FILE).stat().st_size > 10_000
    assert geometry["codebook_size"] == 5 and geometry["latent_dim"] == 4 and geometry["neighbours"] == 2
    assert geometry["num_tokens"] == 19 and geometry["active_codes"] == 4 and geometry["dead_codes"] == 1
    per_code = geometry["per_code"]
    assert per_code["counts"] == COUNTS
    # nearest other centre: 0->1, 1->0, 3->1, 7->3, 15->7; second nearest: 0->3, 1->3, 3->0, 7->1 (6), 15->3 (12)
    assert per_code["nearest_neighbour_distance"] == pytest.approx([1, 1, 2, 4, 8])
    assert per_code["knn_distance"] == pytest.approx([3, 2, 3, 6, 12])
    assert geometry["nearest_neighbour_distance"]["q00"] == pytest.approx(1)
    assert geometry["nearest_neighbour_distance"]["q50"] == pytest.approx(2)
    assert geometry["nearest_neighbour_distance"]["q100"] == pytest.approx(8)
    assert geometry["knn_distance_median_used"] == pytest.approx(3) and geometry["knn_distance_median_unused"] == pytest.approx(12)
    # usage ranks 5,4,3,2,1 against k-NN distance ranks 2.5,1,2.5,4,5: rho = -8 / sqrt(10 * 9.5)
    assert geometry["usage_knn_distance_spearman"] == pytest.approx(-8 / math.sqrt(95))
    # collinear centres: one principal axis holds all the variance; coordinates = position - mean (up to sign)
    assert geometry["pca_explained_variance_ratio"] == pytest.approx([1.0, 0.0], abs=1e-12)
    first_axis = [abs(point[0]) for point in per_code["pca"]]
    mean = sum(POSITIONS) / len(POSITIONS)
    assert first_axis == pytest.approx([abs(p - mean) for p in POSITIONS])
    assert geometry["duplicate_centres"] == 0 and geometry["quantizer"] == "lgq"


def test_duplicates_and_degenerate_usage():
    centres = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    geometry = codebook_geometry(centres, torch.tensor([4, 4, 4]), neighbours=8)  # n clipped to K - 1
    assert geometry["neighbours"] == 2 and geometry["duplicate_centres"] == 2
    assert geometry["usage_knn_distance_spearman"] is None  # constant usage: no rank correlation
    assert geometry["knn_distance_median_unused"] is None
    with pytest.raises(ValueError, match="must agree"):
        codebook_geometry(centres, torch.tensor([1, 2]))


def test_assignment_geometry_of_known_latents():
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    latents = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # squared distances [0, 9, 16] and [1, 4, 17]
    geometry = assignment_geometry(latents, centres, tau=2.0, chunk_size=1)  # chunking must not change anything
    assert geometry["num_latents"] == 2
    assert geometry["latent_spread"] == pytest.approx(0.25)  # mean (0.5, 0): each latent 0.5 away
    # centres' squared distances from (0.5, 0): 0.25, 6.25, 16.25; only centre 0 is anyone's nearest
    assert geometry["centre_offset"] == pytest.approx((0.25 + 6.25 + 16.25) / 3)
    assert geometry["centre_offset_used"] == pytest.approx(0.25)
    assert geometry["nearest_sq_distance"]["q00"] == pytest.approx(0) and geometry["nearest_sq_distance"]["q100"] == pytest.approx(1)
    assert geometry["margin"]["q00"] == pytest.approx(3) and geometry["margin"]["q100"] == pytest.approx(9)
    assert geometry["margin_over_tau"]["mean"] == pytest.approx(3)
    max_p = [1 / (1 + math.exp(-9 / 2) + math.exp(-16 / 2)), 1 / (1 + math.exp(-3 / 2) + math.exp(-16 / 2))]
    assert geometry["mean_max_probability"] == pytest.approx(sum(max_p) / 2)
    assert "tau" not in assignment_geometry(latents, centres)  # VQ-style: no temperature
    with pytest.raises(ValueError, match="must agree"):
        assignment_geometry(torch.zeros(2, 3), centres)


def test_counting_over_a_split_and_bad_counts_file(tmp_path):
    line_tokenizer("vq").save_pretrained(tmp_path / "tok")
    geometry = main(["--tokenizer", str(tmp_path / "tok"), "--output-dir", str(tmp_path / "geo"), "--split", "train",
                     "--data.name", "synthetic", "--data.image_size", "16", "--data.num_images", "6",
                     "--data.num_classes", "3", "--batch-size", "4",
                     "--assignment-images", "5"])
    assert geometry["num_tokens"] == 6 * 8 * 8 and geometry["protocol"]["num_images"] == 6
    assert sum(geometry["per_code"]["counts"]) == 6 * 64
    # the latents of the first 5 images (8x8 tokens each) among the centres; VQ has no temperature
    assert geometry["assignments"]["num_latents"] == 5 * 64 and "tau" not in geometry["assignments"]
    assert geometry["protocol"]["assignment_images"] == 5
    lgq = line_tokenizer("lgq")
    lgq.quantizer.tau.fill_(0.5)
    lgq.save_pretrained(tmp_path / "lgq")
    assignments = main(["--tokenizer", str(tmp_path / "lgq"), "--output-dir", str(tmp_path / "geo-lgq"), "--split",
                        "train", "--data.name", "synthetic", "--data.image_size", "16", "--data.num_images", "6",
                        "--data.num_classes", "3", "--assignment-images", "2"])["assignments"]
    assert assignments["tau"] == 0.5 and assignments["num_latents"] == 2 * 64  # LGQ's exported temperature
    assert 1 / 5 <= assignments["mean_max_probability"] <= 1
    assert assignments["margin_over_tau"]["q50"] == pytest.approx(assignments["margin"]["q50"] / 0.5)
    assert assignments["ste_gain"] > 0  # LGQ's straight-through gain (its definition: tests/test_lgq.py)
    (tmp_path / "bad.json").write_text(json.dumps({"counts": [1, 2]}))
    with pytest.raises(ValueError, match="2 counts, the tokenizer has K=5"):
        main(["--tokenizer", str(tmp_path / "tok"), "--output-dir", str(tmp_path / "g2"), "--counts",
              str(tmp_path / "bad.json")])


def test_quantile_summary_matches_the_definition_and_takes_more_than_2_to_the_24_values():
    from eval.codebook_geometry import QUANTILES, quantile_summary

    values = torch.arange(101, dtype=torch.float32).flip(0)  # 100, 99, ..., 0: the q-quantile is 100 q
    summary = quantile_summary(values)
    assert all(summary[f"q{int(q * 100):02d}"] == pytest.approx(100 * q) for q in QUANTILES)
    assert summary["mean"] == pytest.approx(50.0)
    many = torch.zeros(2 ** 24 + 1)  # torch.quantile refuses inputs this large
    many[-1] = 1.0
    assert quantile_summary(many)["q50"] == 0.0 and quantile_summary(many)["mean"] == pytest.approx(2.0 ** -24)
