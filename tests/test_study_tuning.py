"""experiments.study.tuning: the equal tuning budget (same number of trials per quantizer, chosen at one seed on a
split the study does not report, every trial written down, failures too)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from experiments import study
from experiments.study import tuning
from test_study import write_study  # tests/test_study.py: the tiny synthetic study config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TRIALS = {"vq": [[], ["model.quantizer_options.beta=0.5"]],
          "fsq": [[], {1024: ["model.quantizer_options.levels=[4,4,4,4,4]"]}]}  # a trial whose value depends on K


def tuned_study(tmp_path, **tuning_fields):
    return write_study(tmp_path, tuning={"split": "tune", "seed": 0, "metric": "psnr", "trials": TRIALS,
                                         **tuning_fields})


@pytest.mark.slow
def test_every_trial_is_trained_on_the_tuning_split_and_the_best_becomes_every_seeds_recipe(tmp_path, capsys):
    out = tmp_path / "out"
    results = study.main(["--config", str(tuned_study(tmp_path)), "--output-dir", str(out)])
    table = json.loads((out / "tuning" / "trials.json").read_text())
    rows = table["trials"]
    assert [(r["quantizer"], r["K"], r["trial"]) for r in rows] == [("fsq", 1024, 0), ("fsq", 1024, 1),
                                                                     ("vq", 1024, 0), ("vq", 1024, 1)]
    assert all(r["status"] == "ok" and r["split"] == "tune" and r["seed"] == 0 for r in rows)
    assert rows[1]["overrides"] == ["model.quantizer_options.levels=[4,4,4,4,4]"]
    for row in rows:  # the recorded metric is the trial's own evaluation, on the tuning split
        trial_result = json.loads((out / "tuning" / f"{row['quantizer']}_K1024_trial{row['trial']}" / "result.json")
                                  .read_text())
        assert row["metric"] == trial_result["psnr"] and "generation" not in trial_result  # no second stage
    by_run = {r["run"]: r for r in results}
    for quantizer in ("vq", "fsq"):
        pair = [r for r in rows if r["quantizer"] == quantizer]
        best = max(pair, key=lambda r: (r["metric"], -r["trial"]))
        assert [r["chosen"] for r in pair] == [r is best for r in pair]
        options = by_run[f"{quantizer}_K1024_s0"]["config"]["model"]["quantizer_options"]
        expected = {} if best["trial"] == 0 else (
            {"beta": 0.5} if quantizer == "vq" else {"levels": [4, 4, 4, 4, 4]})
        assert options == expected
        # the seed-0 run repeats the chosen trial's training exactly, and is scored on other images
        trial_dir = out / "tuning" / f"{quantizer}_K1024_trial{best['trial']}"
        run_dir = out / "runs" / f"{quantizer}_K1024_s0"
        trial_weights, run_weights = (load_file(d / "tokenizer" / "diffusion_pytorch_model.safetensors")
                                      for d in (trial_dir, run_dir))
        assert trial_weights.keys() == run_weights.keys()
        assert all(torch.equal(trial_weights[k], run_weights[k]) for k in trial_weights)
        assert by_run[f"{quantizer}_K1024_s0"]["psnr"] != best["metric"]
    text = (out / "tuning" / "trials.md").read_text()
    assert text.count("| vq | 1024 |") == 2 and text.count("| fsq | 1024 |") == 2 and "levels=[4,4,4,4,4]" in text
    capsys.readouterr()

    # a second call reuses every trial and run; --finished-only reads the choice from trials.json
    study.main(["--config", str(tuned_study(tmp_path)), "--output-dir", str(out)])
    assert "[study] training" not in capsys.readouterr().out
    again = study.main(["--config", str(tuned_study(tmp_path)), "--output-dir", str(out), "--finished-only"])
    def options(rows):
        return {r["run"]: r["config"]["model"]["quantizer_options"] for r in rows}
    assert options(again) == options(results)

    # --use-trials with the same choice plans exactly these runs (no trial trained, every run reused)
    best = {q: max((r for r in rows if r["quantizer"] == q), key=lambda r: (r["metric"], -r["trial"]))["trial"]
            for q in ("vq", "fsq")}
    given = study.main(["--config", str(tuned_study(tmp_path)), "--output-dir", str(out), "--use-trials",
                        *(f"{q}:{i}" for q, i in best.items())])
    printed = capsys.readouterr().out
    assert "tuning not trained" in printed and "[study] training" not in printed and "tuning trial" not in printed
    assert options(given) == options(results)


def test_the_budget_is_equal_and_the_tuning_split_is_not_the_reported_one(tmp_path):
    spec = study.load_study_config(tuned_study(tmp_path))
    assert spec.tuning["split"] == "tune" and spec.tuning["trials"] == TRIALS
    with pytest.raises(ValueError, match="different budgets"):
        study.load_study_config(write_study(tmp_path, tuning={"trials": {"vq": [[], []], "fsq": [[]]}}))
    with pytest.raises(ValueError, match=r"no trials for \['fsq'\]"):
        study.load_study_config(write_study(tmp_path, tuning={"trials": {"vq": [[]]}}))
    with pytest.raises(ValueError, match="must differ from the split the study reports"):
        study.load_study_config(tuned_study(tmp_path, split="val"))
    with pytest.raises(ValueError, match="unknown tuning keys"):
        study.load_study_config(tuned_study(tmp_path, budget=3))
    with pytest.raises(ValueError, match="metric"):
        study.load_study_config(tuned_study(tmp_path, metric="loss"))
    with pytest.raises(ValueError, match="key=value"):
        study.load_study_config(write_study(tmp_path, tuning={"trials": {"vq": [["beta"]], "fsq": [[]]}}))


def test_a_trial_invalid_at_one_K_is_refused_instead_of_shrinking_that_budget(tmp_path):
    spec = study.load_study_config(write_study(tmp_path, tuning={"trials": {
        "vq": [[], []], "fsq": [[], ["model.quantizer_options.levels=[4,4,4,4,4]"]]}}))
    planned = tuning.plan_trials(spec, spec.tuning, tmp_path / "out", ["vq", "fsq"], [1024])
    assert [(s.name, i) for s, i, _ in planned] == [("vq_K1024_s0", 0), ("vq_K1024_s0", 1), ("fsq_K1024_s0", 0),
                                                    ("fsq_K1024_s0", 1)]
    assert [s.run_dir.name for s, _, _ in planned][-1] == "fsq_K1024_trial1"
    assert f"train.output_dir={tmp_path / 'out' / 'tuning' / 'fsq_K1024_trial1'}" in planned[-1][0].overrides
    with pytest.raises(ValueError, match="trial 1 of fsq at K=256.*product"):  # levels for 1024, not 256
        tuning.plan_trials(spec, spec.tuning, tmp_path / "out", ["vq", "fsq"], [256, 1024])
    with pytest.raises(ValueError, match="no overrides for K=256"):
        tuning.trial_overrides({1024: ["train.lr=1e-3"]}, 256)


def test_failed_trials_are_written_down_and_a_pair_with_no_finished_trial_stops_the_sweep(tmp_path, monkeypatch):
    spec = study.load_study_config(tuned_study(tmp_path))
    out = tmp_path / "out"
    scores = {("vq", 0): 20.0, ("fsq", 0): 21.0, ("fsq", 1): 21.0}  # vq trial 1 fails; fsq: a tie

    def fake_run_one(run, trial_study, launcher, measure_memory, dry_run):
        assert trial_study.evaluation["split"] == "tune" and trial_study.generation is None
        index = int(run.run_dir.name.rsplit("trial", 1)[1])
        if (run.quantizer, index) not in scores:
            raise RuntimeError("loss is NaN at step 3\nlong traceback")
        return {"psnr": scores[(run.quantizer, index)], "active_codes": 10, "bits_per_token": 3.0,
                "train_seconds": 1.0}

    monkeypatch.setattr(study.runs, "run_one", fake_run_one)
    chosen = tuning.run_tuning(spec, spec.tuning, out, ["vq", "fsq"], [1024], "inprocess")
    assert chosen == {("vq", 1024): [], ("fsq", 1024): []}  # the tie goes to the earlier trial
    rows = {(r["quantizer"], r["trial"]): r for r in json.loads((out / "tuning" / "trials.json").read_text())["trials"]}
    assert rows[("vq", 1)]["status"] == "failed" and rows[("vq", 1)]["error"] == "RuntimeError: loss is NaN at step 3"
    assert rows[("vq", 1)]["metric"] is None and not rows[("vq", 1)]["chosen"]
    assert [rows[("fsq", i)]["chosen"] for i in (0, 1)] == [True, False]
    assert "failed: RuntimeError: loss is NaN at step 3" in (out / "tuning" / "trials.md").read_text()
    assert tuning.load_tuned(out, spec.tuning, ["vq", "fsq"], [1024]) == chosen

    scores.pop(("vq", 0))  # now every vq trial fails: the sweep stops naming them, the table still lists them
    with pytest.raises(ValueError, match=r"every tuning trial of \[\('vq', 1024\)\] failed.*loss is NaN"):
        tuning.run_tuning(spec, spec.tuning, out, ["vq", "fsq"], [1024], "inprocess")
    rows = json.loads((out / "tuning" / "trials.json").read_text())["trials"]
    assert [r["status"] for r in rows if r["quantizer"] == "vq"] == ["failed", "failed"]
    with pytest.raises(ValueError, match="does not exist"):
        tuning.load_tuned(tmp_path / "elsewhere", spec.tuning, ["vq"], [1024])


def test_no_tuning_trains_the_recipe_as_it_is_and_a_dry_run_lists_the_trials(tmp_path, capsys):
    config, out = tuned_study(tmp_path), tmp_path / "out"
    study.main(["--config", str(config), "--output-dir", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert "[study] tuning: 4 trial(s)" in printed and "tuning trial fsq_K1024_trial1: model.quantizer_options.levels" \
        in printed
    study.main(["--config", str(config), "--output-dir", str(out), "--dry-run", "--no-tuning"])
    assert "[study] tuning" not in capsys.readouterr().out
    assert not (out / "tuning").exists()


def test_use_trials_names_one_configured_trial_per_planned_quantizer(tmp_path, capsys):
    settings = tuning.tuning_settings({"split": "tune", "seed": 0, "metric": "psnr", "trials": TRIALS}, "val")
    chosen = tuning.given_choices(settings, ["vq:1", "fsq:1"], ["vq", "fsq"], [1024])
    assert chosen == {("vq", 1024): ["model.quantizer_options.beta=0.5"],
                      ("fsq", 1024): ["model.quantizer_options.levels=[4,4,4,4,4]"]}
    chosen = tuning.given_choices(settings, ["vq:1", "fsq:0"], ["vq", "fsq"], [256, 1024])
    assert chosen == {("vq", 256): ["model.quantizer_options.beta=0.5"],
                      ("vq", 1024): ["model.quantizer_options.beta=0.5"], ("fsq", 256): [], ("fsq", 1024): []}
    with pytest.raises(ValueError, match="gives no overrides for K=256"):  # fsq's trial 1 exists at K = 1024 only
        tuning.given_choices(settings, ["vq:0", "fsq:1"], ["vq", "fsq"], [256, 1024])
    for given, message in ((["vq:2", "fsq:0"], r"vq has 2 trial\(s\), indices 0..1"),
                           (["vq:one"], r"quantizer:trial_index"), (["lfq:0"], r"no trials for 'lfq'"),
                           (["vq:0"], r"names no trial for \['fsq'\]")):
        with pytest.raises(ValueError, match=message):
            tuning.given_choices(settings, given, ["vq", "fsq"], [1024])
    config, out = tuned_study(tmp_path), tmp_path / "out"
    with pytest.raises(ValueError, match="use one"):
        study.main(["--config", str(config), "--output-dir", str(out), "--dry-run", "--no-tuning",
                    "--use-trials", "vq:0", "fsq:0"])
    study.main(["--config", str(config), "--output-dir", str(out), "--dry-run", "--use-trials", "vq:1", "fsq:0"])
    printed = capsys.readouterr().out
    assert "vq K=1024: model.quantizer_options.beta=0.5; fsq K=1024: the recipe" in printed
    assert "tuning trial" not in printed and not (out / "tuning").exists()


def test_curves_need_no_finished_tuning_and_finished_only_names_the_missing_one(tmp_path):
    """--curves reads run histories only (their folders do not depend on the tuning's choice); --finished-only
    merges results whose recipes include the choice, so it needs tuning/trials.json."""
    config, out = tuned_study(tmp_path), tmp_path / "out"
    with pytest.raises(ValueError, match="no run in .* has a history yet"):
        study.main(["--config", str(config), "--output-dir", str(out), "--curves"])
    with pytest.raises(ValueError, match=r"tuning.*trials.json does not exist"):
        study.main(["--config", str(config), "--output-dir", str(out), "--finished-only"])


def test_photo_tuning_holds_its_square_out_of_the_trials_training_only(tmp_path):
    """configs/study/builtin.yaml tunes on the photos' "tune" split: every trial (and no sweep run) trains with
    data.tune_region, so no trial is scored on pixels it trained on; the budget is the same for all six."""
    spec = study.load_study_config("configs/study/builtin.yaml")
    assert spec.tuning["split"] == "tune" and spec.tuning["overrides"] == ["data.tune_region=0.35"]
    assert {len(spec.tuning["trials"][q]) for q in ("lgq", "vq", "fsq", "simvq", "lfq", "ibq")} == {4}
    out = tmp_path / "photos"
    tiny = ["data.image_size=32", "data.crops_per_photo=2", "data.val_crops_per_photo=2", "train.max_steps=2",
            "train.warmup_steps=1", "train.checkpoint_every=0", "train.image_log_every=0", "eval.num_val_images=4",
            "model.base_channels=8", "eval.quantizer_init_batches=1", "train.log_every=1"]
    config = write_study(tmp_path, tokenizer_configs=["configs/tokenizer/builtin.yaml"], quantizers=["fsq"],
                         overrides=["train.tracker=none", "train.progress_bar=false"], evaluation={"split": "val"},
                         tuning={"overrides": ["data.tune_region=0.35"], "trials": {"fsq": [[]]}})
    (result,) = study.main(["--config", str(config), "--output-dir", str(out), "--no-memory", *tiny])
    (row,) = json.loads((out / "tuning" / "trials.json").read_text())["trials"]
    assert row["status"] == "ok" and row["trial_overrides"] == ["data.tune_region=0.35"]
    trial = json.loads((out / "tuning" / "fsq_K1024_trial0" / "result.json").read_text())
    assert trial["config"]["data"]["tune_region"] == 0.35 and result["config"]["data"]["tune_region"] == 0.0
    assert row["metric"] == trial["psnr"] != result["psnr"]  # scored on the tune crops, the sweep on val
    assert "every trial with data.tune_region=0.35" in (out / "tuning" / "trials.md").read_text()
    assert {p.name for p in (out / "classifier").iterdir() if p.is_dir()} == {"builtin-32px", "builtin-32px-tune0.35"}
    # a stored trial made with other trial overrides is not this tuning's trial
    assert not tuning._still_configured(row, {**spec.tuning, "trials": {"fsq": [[]]}, "overrides": []})
    with pytest.raises(ValueError, match="tuning.overrides"):
        study.load_study_config(write_study(tmp_path, tuning={"overrides": "data.tune_region=0.35",
                                                              "trials": {"vq": [[]], "fsq": [[]]}}))
