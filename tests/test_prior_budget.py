"""experiments.study.prior_budget: the study's second-stage prior again at other budgets, on a tiny finished study."""
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.training import read_history
from experiments import study
from experiments.study import prior_budget
from test_study import PRIOR_OVERRIDES, TINY_PRIOR, write_study  # tests/test_study.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_recipe(tmp_path):
    """(prior config, overrides): the tests' tiny prior with its recipe keys written into the config file, so the
    overrides only log and set the budget (their recipe is ``recipe``, the config file as it is)."""
    recipe = [item for item in PRIOR_OVERRIDES
              if prior_budget.override_key(item) not in prior_budget.NEUTRAL_KEYS]
    config = tmp_path / "tiny_prior.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(TINY_PRIOR), OmegaConf.from_dotlist(recipe)), config)
    return config, [item for item in PRIOR_OVERRIDES if item not in recipe]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """One LGQ run (K = 256) with its second stage, full and pruned: a prior of 3 steps (the recipe)."""
    out, _, result = tiny_study(tmp_path_factory.mktemp("budget"))
    return out, result


def tiny_study(tmp_path):
    """(study folder, study config, result) of one finished LGQ run (K = 256) with its second stage, full and
    pruned, of the tiny recipe (``tiny_recipe``) for 3 steps."""
    prior_config, overrides = tiny_recipe(tmp_path)
    generation = {"prior_config": str(prior_config), "overrides": overrides, "num_samples": 8, "batch_size": 4,
                  "num_inference_steps": 2, "guidance_scale": 2.0, "prune": ["lgq"]}
    config = write_study(tmp_path, quantizers=["lgq"], codebook_sizes=[256], generation=generation)
    out = tmp_path / "out"
    (result,) = study.main(["--config", str(config), "--output-dir", str(out), "--no-memory"])
    return out, config, result


@pytest.mark.slow
def test_budgets_reuse_the_recipes_stage_and_the_runs_tokens_train_longer_priors_and_resume(finished_study, capsys):
    out, result = finished_study
    run_dir = out / "runs" / "lgq_K256_s0"
    tokens_meta = run_dir / "generation" / "tokens" / "meta.json"
    tokens_stamp = tokens_meta.stat().st_mtime_ns

    rows = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "3", "6"])
    by_steps = {row["prior_steps"]: row for row in rows}
    # the recipe's budget (3 steps) is the run's own second stage, read back and not trained again
    assert by_steps[3]["classifier_accuracy"] == result["generation"]["classifier_accuracy"]
    assert by_steps[3]["source"].endswith("result.json (generation)")
    assert not prior_budget.budget_folder(out, "lgq_K256_s0", False, 3).exists()
    # the longer budget: a prior of 6 steps on the run's own tokens (not extracted again), same sampler settings
    stage = prior_budget.budget_folder(out, "lgq_K256_s0", False, 6)
    assert by_steps[6]["status"] == "ok" and 0.0 <= by_steps[6]["classifier_accuracy"] <= 1.0
    assert 0.0 <= json.loads((stage / "generation.json").read_text())["sampled_unused_code_share"] <= 1.0
    assert [row["step"] for row in read_history(stage / "prior_run") if "loss" in row][-1] == 6
    assert OmegaConf.load(stage / "prior_run" / "config.yaml").train.max_steps == 6
    assert OmegaConf.load(stage / "prior_run" / "config.yaml").data.tokens == str(tokens_meta.parent)
    assert tokens_meta.stat().st_mtime_ns == tokens_stamp and not (stage / "tokens").exists()
    generation = json.loads((stage / "generation.json").read_text())
    assert generation["prior_steps"] == 6 and generation["settings"]["overrides"][-1] == "train.max_steps=6"
    assert {k: v for k, v in generation["settings"].items() if k != "overrides"} == \
        {k: v for k, v in result["generation"]["settings"].items() if k != "overrides"}
    table = (out / "prior_budget" / "results.md").read_text()
    assert "| lgq_K256_s0 | full | recipe | 0 | 6 | 256 |" in table and "Converged at N" in table
    assert "| lgq | 256 | full | recipe | 6 | run | 1 | 0 |" in (out / "prior_budget" / "summary.md").read_text()

    # the pruned codebook in another call: its rows join the table, the full ones stay
    pruned = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "6", "--pruned"])
    assert pruned[0]["codebook_size"] == result["generation_pruned"]["codebook_size"]
    saved = json.loads((out / "prior_budget" / "results.json").read_text())
    assert {(row["codebook"], row["prior_seed"], row["prior_steps"]) for row in saved} == \
        {("full", 0, 3), ("full", 0, 6), ("pruned", 0, 6)}

    # another prior seed: its own folder and prior, even at the recipe's budget, and its own rows
    (seeded,) = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "3",
                                   "--prior-seed", "7"])
    seeded_stage = prior_budget.budget_folder(out, "lgq_K256_s0", False, 3, prior_seed=7)
    assert seeded["prior_seed"] == 7 and seeded["source"] == str(seeded_stage / "generation.json")
    assert OmegaConf.load(seeded_stage / "prior_run" / "config.yaml").train.seed == 7
    saved = json.loads((out / "prior_budget" / "results.json").read_text())
    assert {(row["codebook"], row["prior_seed"], row["prior_steps"]) for row in saved} == \
        {("full", 0, 3), ("full", 0, 6), ("pruned", 0, 6), ("full", 7, 3)}

    # a changed recipe at the recipe's budget and seed: its own folder, prior and rows, the change in its config
    (changed,) = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "3",
                                    "--prior-set", "train.lr=5e-4"])
    changed_stage = prior_budget.budget_folder(out, "lgq_K256_s0", False, 3, changes=["train.lr=5e-4"])
    assert changed_stage.name == "full_steps3_train.lr-5e-4"
    assert changed["recipe"] == "train.lr=5e-4" and changed["source"] == str(changed_stage / "generation.json")
    assert OmegaConf.load(changed_stage / "prior_run" / "config.yaml").train.lr == 5e-4
    assert "| lgq_K256_s0 | full | train.lr=5e-4 | 0 | 3 |" in (out / "prior_budget" / "results.md").read_text()
    assert len(json.loads((out / "prior_budget" / "results.json").read_text())) == 5
    # a folder whose prior has another value of a changed key is refused with both named
    with pytest.raises(ValueError, match=r"prior of train.lr=0.0005, not train.lr=1e-4"):
        prior_budget.check_prior_recipe(changed_stage, 3, ["train.lr=1e-4"])

    # a second call reuses the finished prior: nothing trained again, same figures
    stamps = {p: p.stat().st_mtime_ns for p in (stage / "prior_run" / "prior").iterdir()}
    capsys.readouterr()
    again = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "6"])
    assert again[0]["classifier_accuracy"] == by_steps[6]["classifier_accuracy"]
    assert {p: p.stat().st_mtime_ns for p in (stage / "prior_run" / "prior").iterdir()} == stamps

    # a prior folder trained for another budget is refused with both budgets named
    wrong = prior_budget.budget_folder(out, "lgq_K256_s0", False, 9)
    shutil.copytree(stage, wrong)
    (wrong / "generation.json").unlink()
    with pytest.raises(ValueError, match=r"prior of train.max_steps=6, not 9"):
        prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "9"])


def test_a_recipe_change_must_be_a_known_key_and_not_one_with_its_own_option():
    settings = {"prior_config": str(TINY_PRIOR), "overrides": ["train.tracker=none"]}
    assert prior_budget.check_recipe_changes(["train.lr=1e-3", "model.dropout=0.1"], settings, "tokens") == \
        ["train.lr=1e-3", "model.dropout=0.1"]
    with pytest.raises(ValueError, match="train.lrr"):
        prior_budget.check_recipe_changes(["train.lrr=1e-3"], settings, "tokens")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        prior_budget.check_recipe_changes(["train.lr"], settings, "tokens")
    for reserved in ("train.max_steps=5", "train.seed=3", "data.tokens=x", "train.output_dir=y"):
        with pytest.raises(ValueError, match="is not a recipe change"):
            prior_budget.check_recipe_changes([reserved], settings, "tokens")
    assert prior_budget.recipe_label([]) == "recipe"
    assert prior_budget.with_steps(settings, 9, ["train.lr=1e-3"])["overrides"] == \
        ["train.tracker=none", "train.max_steps=9", "train.lr=1e-3"]


def test_a_recipe_is_named_by_its_changes_to_the_config_file_in_one_order_whatever_the_order_given():
    unigram = "model.output_bias_init=unigram"
    logging = ["train.tracker=none", "train.progress_bar=false", "train.image_log_every=0"]
    old = {"prior_config": str(TINY_PRIOR), "overrides": logging}
    assert prior_budget.recipe_changes(old) == []  # logging only: the config file's recipe
    # the last value of a key wins (OmegaConf's dotlist), in the order of those last values; the budget is no change
    assert prior_budget.recipe_changes({"overrides": ["train.lr=1e-3", "train.max_steps=5", unigram,
                                                      "train.lr=5e-4"]}) == [unigram, "train.lr=5e-4"]
    new = prior_budget.with_steps(old, 2200, [unigram])
    assert new["overrides"] == [*logging, "train.max_steps=2200", unigram]
    # the same recipe and budget reached from the changed recipe, or given in another order: equal settings
    assert prior_budget.with_steps(new, 2200, [unigram]) == new
    assert prior_budget.with_steps({**old, "overrides": [unigram, *reversed(logging)]}, 2200)["overrides"] == \
        [*reversed(logging), "train.max_steps=2200", unigram]
    assert prior_budget.with_steps(new, 4400)["overrides"] == [*logging, "train.max_steps=4400", unigram]
    # a change overrides the recipe's own value of its key
    assert prior_budget.with_steps(new, 2200, ["model.output_bias_init=zero"])["overrides"][-1] == \
        "model.output_bias_init=zero"


def test_the_study_default_second_stage_is_the_unigram_start_at_2200_steps_in_the_budgets_order():
    """configs/study/glyphs.yaml: the prior recipe the stall measurements chose, written so that a prior_budget
    folder of that recipe and budget has equal settings (and is recorded by the study, not trained again)."""
    from experiments import study as study_package
    from prior.config import PriorRunConfig
    from common.config import load_config

    settings = study_package.load_study_config("configs/study/glyphs.yaml").generation
    assert prior_budget.recipe_changes(settings) == ["model.output_bias_init=unigram"]
    assert prior_budget.recipe_steps(settings) == 2200
    assert prior_budget.with_steps(settings, 2200) == settings
    zero_start = {**settings, "overrides": ["train.tracker=none", "train.progress_bar=false",
                                            "train.image_log_every=0"]}  # the study's recipe before the change
    assert prior_budget.with_steps(zero_start, 2200, ["model.output_bias_init=unigram"]) == settings
    loaded = load_config(PriorRunConfig, [prior_budget.resolve_config_path(settings["prior_config"])],
                         [*settings["overrides"], "data.tokens=tokens"])
    assert loaded.model.output_bias_init == "unigram" and loaded.train.max_steps == 2200


def test_a_missing_run_or_a_run_without_its_second_stage_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished study run"):
        prior_budget.main(["--study-dir", str(tmp_path), "--runs", "vq_K1024_s0", "--steps", "100"])
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        prior_budget.main(["--study-dir", str(tmp_path), "--runs", "vq_K1024_s0", "--steps", "0"])


def test_the_budget_of_the_recipe_and_the_longer_budgets_overrides():
    settings = {"prior_config": str(TINY_PRIOR), "overrides": ["train.tracker=none", "train.max_steps=3"]}
    assert prior_budget.recipe_steps(settings) == 3
    assert prior_budget.recipe_steps({**settings, "overrides": []}) == OmegaConf.load(TINY_PRIOR).train.max_steps
    longer = prior_budget.with_steps(settings, 12)
    assert longer["overrides"] == ["train.tracker=none", "train.max_steps=12"]
    assert prior_budget.recipe_steps(longer) == 12


def row(steps, accuracy, fd, run="vq_K1024_s0", status="ok", prior_seed=0):
    return {"run": run, "codebook": "full", "prior_steps": steps, "prior_seed": prior_seed, "status": status,
            "classifier_accuracy": accuracy, "classifier_fd": fd, "prior_final_loss": 4.0, "sampling_seconds": 1.0, "codebook_size": 1024,
            "error": None if status == "ok" else "RuntimeError: x"}


def test_converged_is_the_smallest_budget_whose_doubling_no_longer_helps():
    """VQ's measured case: 1100 -> 2200 gains 0.51 (not converged); 2200 -> 4400 within the tolerances."""
    rows = [row(1100, 0.473, 50.7), row(2200, 0.986, 1.7), row(4400, 0.989, 1.5)]
    assert prior_budget.converged_budgets(rows) == {("vq_K1024_s0", "full", "recipe", 0): 2200}
    # another prior seed, or another recipe, is its own curve: never paired with seed 0's budgets of the recipe
    other_seed = [row(1100, 0.9, 2.0), row(2200, 0.9, 2.0, prior_seed=1)]
    assert prior_budget.converged_budgets(other_seed) == {("vq_K1024_s0", "full", "recipe", 0): None,
                                                          ("vq_K1024_s0", "full", "recipe", 1): None}
    other_recipe = [row(1100, 0.9, 2.0), {**row(2200, 0.9, 2.0), "recipe": "train.lr=1e-3"}]
    assert set(prior_budget.converged_budgets(other_recipe).values()) == {None}
    # the sample FD still falling by more than its tolerance: not converged, whatever the accuracy
    assert prior_budget.converged_budgets([row(2200, 0.986, 4.0), row(4400, 0.989, 1.5)]) == \
        {("vq_K1024_s0", "full", "recipe", 0): None}
    # no doubling measured, or the longer one failed: not shown
    assert prior_budget.converged_budgets([row(1100, 0.9, 2.0), row(3000, 0.9, 2.0)])[
        ("vq_K1024_s0", "full", "recipe", 0)] is None
    failed = [row(2200, 0.986, 1.7), row(4400, None, None, status="failed")]
    assert prior_budget.converged_budgets(failed)[("vq_K1024_s0", "full", "recipe", 0)] is None
    table = prior_budget.budget_table(failed)
    assert "| vq_K1024_s0 | full | recipe | 0 | 4400 | - | failed: RuntimeError: x |" in table and "not shown" in table
    assert "| vq_K1024_s0 | full | recipe | 0 | 2200 | 1024 | 0.986 | 1.7 | 4.00 | n/a |" in table  # share not recorded


def test_the_summary_averages_over_tokenizer_seeds_per_quantizer_recipe_and_budget_and_counts_failures():
    unigram = "model.output_bias_init=unigram"
    rows = [{**row(2200, 0.9, 3.0, run="vq_K1024_s0"), "recipe": unigram},
            {**row(2200, 0.5, 9.0, run="vq_K1024_s1", prior_seed=1), "recipe": unigram, "prior_final_loss": 5.0},
            {**row(2200, None, None, run="vq_K1024_s2", prior_seed=2, status="failed"), "recipe": unigram},
            row(1100, 0.1, 50.0, run="vq_K1024_s0"),  # the recipe itself: its own group
            row(2200, 0.7, 4.0, run="vq_K1024_s1", prior_seed=0),  # a fixed prior seed: its own group
            row(2200, 0.95, 2.0, run="fsq_K1024_s0")]
    summary = {(e["quantizer"], e["recipe"], e["prior_steps"], e["prior_seed"]): e
               for e in prior_budget.summary_rows(rows)}
    assert set(summary) == {("vq", unigram, 2200, "run"), ("vq", "recipe", 1100, "run"), ("vq", "recipe", 2200, "0"),
                            ("fsq", "recipe", 2200, "run")}
    vq = summary[("vq", unigram, 2200, "run")]
    assert vq["runs"] == ["vq_K1024_s0", "vq_K1024_s1", "vq_K1024_s2"] and vq["failed"] == ["vq_K1024_s2"]
    assert vq["classifier_accuracy_mean"] == pytest.approx(0.7) and vq["classifier_accuracy_std"] == pytest.approx(
        0.4 / 2 ** 0.5)
    assert (vq["classifier_accuracy_min"], vq["classifier_accuracy_max"]) == (0.5, 0.9)
    assert vq["prior_final_loss_mean"] == pytest.approx(4.5) and vq["classifier_fd_mean"] == pytest.approx(6.0)
    assert summary[("fsq", "recipe", 2200, "run")]["classifier_accuracy_std"] is None  # one run: no spread
    table = prior_budget.summary_table(rows)
    assert f"| vq | 1024 | full | {unigram} | 2200 | run | 3 | 1 | 0.700 ± 0.283 | 0.500-0.900 | 6.0 ± 4.2 |" in table
    assert "| fsq | 1024 | full | recipe | 2200 | run | 1 | 0 | 0.950 | 0.950-0.950 | 2.0 |" in table
    every_run_failed = prior_budget.summary_table([row(2200, None, None, status="failed")])
    assert "| vq | 1024 | full | recipe | 2200 | run | 1 | 1 | n/a | - | n/a | n/a | n/a |" in every_run_failed


def test_a_run_name_is_parsed_back_and_any_other_name_is_named():
    from experiments.study.plan import parse_run_name, run_name
    assert parse_run_name(run_name("simvq", 1024, 2)) == ("simvq", 1024, 2)
    with pytest.raises(ValueError, match="'vq_1024' is not a study run name"):
        parse_run_name("vq_1024")


@pytest.mark.slow
def test_a_budget_that_fails_is_reported_as_failed_not_dropped(finished_study, monkeypatch):
    out, _ = finished_study

    def broken(*args, **kwargs):
        raise RuntimeError("prior diverged")

    monkeypatch.setattr(prior_budget, "run_generation", broken)
    (failed,) = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "5"])
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: prior diverged"
    assert "| lgq_K256_s0 | full | recipe | 0 | 5 | - | failed: RuntimeError: prior diverged |" in \
        (out / "prior_budget" / "results.md").read_text()


def write_generation(folder, settings, seed, pruned=False, status="ok"):
    folder.mkdir(parents=True)
    record = {"status": status, "settings": settings, "pruned": pruned, "classifier_accuracy": 0.5,
              "protocol": {"prior_argv": ["--config", "c.yaml", "data.tokens=t", f"train.seed={seed}"]}}
    (folder / "generation.json").write_text(json.dumps(record))
    return folder


def test_a_stage_made_elsewhere_is_found_only_with_the_same_settings_codebook_and_prior_seed(tmp_path):
    from experiments.study.generation import finished_elsewhere

    settings = {"prior_config": "c.yaml", "overrides": ["train.max_steps=4", "model.output_bias_init=unigram"]}
    other = {**settings, "overrides": ["train.max_steps=8", "model.output_bias_init=unigram"]}
    folders = [write_generation(tmp_path / "steps8", other, 0), write_generation(tmp_path / "seed7", settings, 7),
               write_generation(tmp_path / "pruned", settings, 0, pruned=True),
               write_generation(tmp_path / "failed", settings, 0, status="failed"), tmp_path / "no_such_folder",
               write_generation(tmp_path / "same", settings, 0)]
    found = finished_elsewhere(folders, settings, 0, pruned=False)
    assert found["source"] == str(tmp_path / "same" / "generation.json") and found["classifier_accuracy"] == 0.5
    assert finished_elsewhere(folders, settings, 0, pruned=True)["source"].endswith("pruned/generation.json")
    assert finished_elsewhere(folders, settings, 7, pruned=False)["source"].endswith("seed7/generation.json")
    assert finished_elsewhere(folders, settings, 3, pruned=False) is None
    assert finished_elsewhere(folders[:1], settings, 0, pruned=False) is None


@pytest.mark.slow
def test_the_study_records_the_budgets_prior_of_its_changed_recipe_instead_of_training_it_again(tmp_path, capsys):
    """A study whose second-stage recipe changed to one prior_budget already trained on its runs (full and pruned)
    records those priors (their figures, the source named) and trains none; without them it refuses the folder."""
    out, config, before = tiny_study(tmp_path)
    change = "train.lr=5e-4"
    changed = prior_budget.with_steps(before["generation"]["settings"], 4, [change])
    changed_config = tmp_path / "changed" / "study.yaml"
    changed_config.parent.mkdir()
    payload = json.loads(config.read_text())
    changed_config.write_text(json.dumps({**payload, "generation": {**payload["generation"],
                                                                    "overrides": changed["overrides"]}}))
    # the full codebook's prior of the changed recipe only: the pruned stage's folder has other settings -> refused
    (full,) = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "4",
                                 "--prior-set", change])
    with pytest.raises(ValueError, match=r"generation_pruned was made with other generation settings"):
        study.main(["--config", str(changed_config), "--output-dir", str(out), "--no-memory"])
    # --finished-only trains nothing and refuses nothing: the full stage recorded, the pruned one pending (listed,
    # no figures in the tables), its old record kept in the run's result.json
    (tabulated,) = study.main(["--config", str(changed_config), "--output-dir", str(out), "--no-memory",
                               "--finished-only"])
    assert tabulated["generation"]["source"] == full["source"]
    assert tabulated["generation_pruned"] == {"status": "pending", "settings": changed, "pruned": True}
    saved = json.loads((out / "runs" / "lgq_K256_s0" / "result.json").read_text())
    assert saved["generation_pruned"] == before["generation_pruned"] and saved["generation"]["source"] == full["source"]
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["generation/classifier_accuracy_mean"] == full["classifier_accuracy"]
    assert "generation_pruned/classifier_accuracy_mean" not in row and row["generation_pending"] == [
        "lgq_K256_s0 (pruned)"]
    assert "Second stage not made with the study's generation settings" in (out / "results.md").read_text()
    (pruned,) = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "4",
                                   "--prior-set", change, "--pruned"])
    stage = out / "runs" / "lgq_K256_s0" / "generation"
    stamps = {path: path.stat().st_mtime_ns for path in stage.rglob("*") if path.is_file()}
    capsys.readouterr()
    (after,) = study.main(["--config", str(changed_config), "--output-dir", str(out), "--no-memory"])
    printed = capsys.readouterr().out
    assert "(pruned codebook) made with these settings in" in printed and "M parameters" not in printed
    assert {path: path.stat().st_mtime_ns for path in stage.rglob("*") if path.is_file()} == stamps  # nothing trained
    for key, row in (("generation", full), ("generation_pruned", pruned)):
        assert after[key]["settings"] == changed and after[key]["source"] == row["source"]
        assert after[key]["classifier_accuracy"] == row["classifier_accuracy"]
        assert OmegaConf.load(Path(row["source"]).parent / "prior_run" / "config.yaml").train.lr == 5e-4
    saved = json.loads((out / "runs" / "lgq_K256_s0" / "result.json").read_text())
    assert saved["generation"]["source"] == full["source"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["generation/classifier_accuracy_mean"] == full["classifier_accuracy"]
    # the budget table names the recipe by its change, whether it was given as one or is the study's own now
    (again,) = prior_budget.main(["--study-dir", str(out), "--runs", "lgq_K256_s0", "--steps", "4"])
    assert again["recipe"] == change and again["source"].endswith("result.json (generation)")
    assert again["classifier_accuracy"] == full["classifier_accuracy"]
